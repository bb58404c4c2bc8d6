"""Which dtype a job computes in: one rule for training, evaluation and serving."""

from __future__ import annotations

import torch

__all__ = ["autocast_dtype"]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`train.precision` on `device` -> bf16 for "bf16", and for "auto" on CUDA; else None
    (float32, autocast off)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
