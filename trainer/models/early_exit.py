"""Anytime early-exit inference: each sample leaves at the first exit confident enough, and
only the undecided samples go on through the next blocks.

The decision is the one :func:`trainer.metrics.exit_at_threshold` makes on the full
network's logits (max softmax in float32 >= threshold, the last exit takes everyone left),
so on the same inputs it gives the trainer's anytime predictions while computing less.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from trainer.models.multi_exit import MultiExitNet

__all__ = ["ExitDecision", "early_exit"]


class ExitDecision(NamedTuple):
    predicted: torch.Tensor  # [N] int64 class
    confidence: torch.Tensor  # [N] float32 max softmax at the exit taken
    exit_index: torch.Tensor  # [N] int64, 0-based index into model.exits


@torch.no_grad()
def early_exit(model: MultiExitNet, x: torch.Tensor, threshold: float) -> ExitDecision:
    """x: [N, C, H, W] normalised inputs -> where and how each sample left (model in eval mode).

    After each exit the samples whose confidence reaches `threshold` are dropped from the
    batch, so the blocks ahead run on the rest only; nothing runs once everyone has left.
    """
    n, device = x.shape[0], x.device
    predicted = torch.empty(n, dtype=torch.int64, device=device)
    confidence = torch.empty(n, dtype=torch.float32, device=device)
    exit_index = torch.empty(n, dtype=torch.int64, device=device)
    bar = torch.tensor(threshold, dtype=torch.float32, device=device)
    alive = torch.arange(n, device=device)  # original positions of the samples still running
    h = model.backbone.stem(x)
    k = 0
    for block, head in model.stages():
        h = block(h)
        if head is None:
            continue
        conf, pred = head(h)[0].float().softmax(dim=-1).max(dim=-1)
        leave = conf >= bar
        if k == model.num_exits - 1 or bool(leave.all()):  # everyone left: nothing more to run
            predicted[alive], confidence[alive], exit_index[alive] = pred, conf, k
            break
        if bool(leave.any()):  # else the batch goes on whole, with no gathers
            done = alive[leave]
            predicted[done], confidence[done], exit_index[done] = pred[leave], conf[leave], k
            stay = ~leave
            alive, h = alive[stay], h[stay]
        k += 1
    return ExitDecision(predicted, confidence, exit_index)
