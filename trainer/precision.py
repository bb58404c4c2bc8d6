"""Which dtype a job computes in: one rule for training, evaluation and serving."""

from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["EMULATED_BF16_WARNING", "autocast_dtype", "cpu_has_bf16"]

EMULATED_BF16_WARNING = (
    "train.precision is bf16, but this CPU has no bf16 instructions (AVX-512 BF16 or AMX): "
    "PyTorch emulates them, many times slower than float32 (17x for a small convolution, "
    "measured once); train.precision: fp32 runs faster here"
)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`train.precision` on `device` -> bf16 for "bf16", and for "auto" on CUDA; else None
    (float32, autocast off). Warns when bf16 would be emulated on the CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        if device.type == "cpu" and not cpu_has_bf16():
            warnings.warn(EMULATED_BF16_WARNING, stacklevel=2)
        return torch.bfloat16
    return None


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # PyTorch's own tests ask so
