"""uint8 images -> the normalised float inputs every network of the project is trained on.

Training (:class:`trainer.data.DeviceLoader`) and serving (:mod:`trainer.serving`) both
normalise through these two functions, so a served model sees bit-identical inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["normalise", "pixel_affine"]


def pixel_affine(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each [1, C, 1, 1] float32: (x / 255 - mean) / std == x * scale + shift."""
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


def normalise(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 x * scale + shift, in x's memory format."""
    return x.float().mul_(scale).add_(shift)  # in place on the float copy: keeps the format
