"""Forward FLOPs needed to reach each exit, counted by torch.utils.flop_counter."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.models.multi_exit import MultiExitNet


def _count(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[int, torch.Tensor]:
    with FlopCounterMode(display=False) as counter:
        out = fn(x)
    return counter.get_total_flops(), out


def exit_gflops(model: MultiExitNet, input_shape: tuple[int, int, int]) -> list[float]:
    """Cumulative GFLOPs per sample to reach exit k = 1..K in anytime inference: stem +
    blocks up to exit k's block + the heads of exits 1..k (a sample leaving at exit k has
    evaluated every earlier exit and found it not confident enough).

    FlopCounterMode counts a multiply-add as 2 FLOPs and only matmuls/convs (BN, ReLU and
    pooling are free). input_shape is (C, H, W). Runs in eval mode under no_grad on a batch
    of one, then restores each module's mode, so BN running statistics are untouched.
    """
    param = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            total, h = _count(model.backbone.stem, x)
            gflops = []
            for block, head in model.stages():
                flops, h = _count(block, h)
                total += flops
                if head is not None:
                    head_flops, _ = _count(head, h)
                    total += head_flops
                    gflops.append(total / 1e9)
    finally:
        for module, training in modes:
            module.training = training
    return gflops
