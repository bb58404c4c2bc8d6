"""Image tensors and their splits: uint8 images with labels, the class-stratified split
drawn from a seed alone, and exact per-channel statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DataSplits", "ImageTensors", "channel_stats", "stratified_split", "take"]


@dataclass(frozen=True)
class ImageTensors:
    images: torch.Tensor  # [N, C, H, W] uint8
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device) -> ImageTensors:
        """Copy to `device`; to a GPU from pinned memory, without blocking the host."""
        device = torch.device(device)
        if device.type != "cuda":
            return ImageTensors(self.images.to(device), self.labels.to(device))
        return ImageTensors(
            self.images.pin_memory().to(device, non_blocking=True),
            self.labels.pin_memory().to(device, non_blocking=True),
        )


@dataclass(frozen=True)
class DataSplits:
    train: ImageTensors
    val: ImageTensors | None  # None when val_fraction == 0
    test: ImageTensors
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    flip: bool  # whether a mirrored image keeps its label (pass to DeviceLoader)
    pad: int  # random-crop padding in pixels, image_size // 8 (pass to DeviceLoader)


def stratified_split(
    data: ImageTensors, fraction: float, seed: int
) -> tuple[ImageTensors, ImageTensors]:
    """(rest, part): round(fraction * n_c) random images of each class c go to part.

    Depends on `seed` alone (its own generator), and both keep the original order.
    """
    labels = data.labels
    shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = shuffled[torch.sort(labels[shuffled], stable=True).indices]  # by class, random within
    grouped = labels[order]
    counts = torch.bincount(grouped)
    first = torch.cumsum(counts, 0) - counts  # position of each class's first image in order
    rank = torch.arange(len(order)) - first[grouped]  # rank within its class
    in_part = rank < (counts * fraction).round().long()[grouped]
    rest, part = order[~in_part].sort().values, order[in_part].sort().values
    return take(data, rest), take(data, part)


def take(data: ImageTensors, index: torch.Tensor) -> ImageTensors:
    """The rows `index` of `data`, copied (index_select on flat rows: one memcpy per image)."""
    images = data.images.flatten(1).index_select(0, index).view(-1, *data.images.shape[1:])
    return ImageTensors(images, data.labels[index])


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N, C, H, W], in [0, 1] units.

    Exact, from each channel's 256-bin histogram (faster than summing floats)."""
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * values.square()).sum() / n - mean.square()
        means.append(mean.item() / 255)
        stds.append(max(var.item(), 1.0) ** 0.5 / 255)  # >= 1/255: no division by zero
    return tuple(means), tuple(stds)
