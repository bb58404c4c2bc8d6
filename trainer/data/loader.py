"""The device loader: normalised float batches served from uint8 tensors on the device,
shuffled with an on-device permutation and augmented whole batches at once."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from trainer.data.tensors import ImageTensors
from trainer.pixels import normalise, pixel_affine

__all__ = ["DeviceLoader"]


class DeviceLoader:
    """Iterate ``(inputs [B, C, H, W] normalised float, labels [B] int64)`` over a split.

    Everything runs on the split's device. ``train=True``: each epoch (each ``iter``) draws a
    fresh permutation from `generator`, and each batch gets per-sample random crops of the
    image zero-padded by `pad` pixels (None: ``H // 8``) and, if `flip`, a mirror for about
    half of the samples. The generator must live on the split's device and fully determines
    the order and the augmentation; None uses that device's default generator.
    ``train=False``: the split in order, unaugmented.
    """

    def __init__(
        self,
        split: ImageTensors,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        generator: torch.Generator | None = None,
        pad: int | None = None,
        flip: bool = True,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        drop_last: bool = False,
    ) -> None:
        device = split.images.device
        channels = split.images.shape[1]
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}, but must be >= 1")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values, one per channel")
        if generator is not None and generator.device != device:
            raise ValueError(f"generator is on {generator.device}, but the data is on {device}")
        self.split = split
        self.batch_size = batch_size
        self.train = train
        self.generator = generator
        self.pad = split.images.shape[-1] // 8 if pad is None else pad
        self.flip = flip
        self.channels_last = channels_last
        self.dtype = dtype
        self.drop_last = drop_last
        self._scale, self._shift = pixel_affine(mean, std, device)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.split.images, self.split.labels
        order = None
        if self.train:
            order = torch.randperm(len(labels), generator=self.generator, device=labels.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            if order is None:
                x = images[start : start + self.batch_size]
                y = labels[start : start + self.batch_size]
            else:
                index = order[start : start + self.batch_size]
                x, y = self._augment(images[index]), labels[index]
            yield self._normalise(x), y

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop of the zero-padded batch plus random mirror, as one gather. uint8."""
        if not self.pad and not self.flip:
            return x
        b, c, h, w = x.shape
        p, g, device = self.pad, self.generator, x.device
        padded = F.pad(x, (p, p, p, p)) if p else x  # [B, C, H+2p, W+2p]
        top = torch.randint(0, 2 * p + 1, (b, 1), generator=g, device=device)
        left = torch.randint(0, 2 * p + 1, (b, 1), generator=g, device=device)
        cols = torch.arange(w, device=device).expand(b, w)
        if self.flip:
            mirrored = torch.rand(b, 1, generator=g, device=device) < 0.5
            cols = torch.where(mirrored, cols.flip(1), cols)  # read columns right to left
        rows = top + torch.arange(h, device=device)  # [B, H]
        cols = left + cols  # [B, W]
        flat = rows.unsqueeze(2) * (w + 2 * p) + cols.unsqueeze(1)  # [B, H, W] into padded
        flat = flat.view(b, 1, h * w).expand(b, c, h * w)
        return padded.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # cheaper on uint8
        out = normalise(x, self._scale, self._shift)
        return out if self.dtype == torch.float32 else out.to(self.dtype)
