"""Batched MATE loss vs a naive pairwise Python loop, forward + backward, side by side.

    .venv/bin/python bench/bench_loss.py [--device cpu|cuda] [--repeats 50] [--threads N]

Both implementations run in the same process on the same inputs, alternating within each
repeat, after a warm-up; the table reports medians and the ratio naive / batched. The naive
reference lives in tests/reference_losses.py, which the tests also check against.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_losses import naive_mate_loss
from trainer.config import DTDConfig, LossConfig
from trainer.losses import init_teacher_logits, multi_exit_loss

CONFIGS: dict[str, LossConfig] = {
    "mate": LossConfig(kind="mate"),
    "mate+ps": LossConfig(kind="mate", teacher_adjust="ps"),
    "mate+dtd(flsw)": LossConfig(kind="mate", dtd=DTDConfig(weighting="flsw")),
    "mate+corr": LossConfig(kind="mate", correlation_weight=0.1),
    "mate+dtd(flsw)+ps+corr": LossConfig(
        kind="mate", dtd=DTDConfig(weighting="flsw"), teacher_adjust="ps", correlation_weight=0.1
    ),
}


def _batched(cfg, z, f, y, a, projections) -> torch.Tensor:
    return multi_exit_loss(cfg, z, f, y, a, projections=projections).total


def _time_step(loss_fn: Callable, cfg: LossConfig, inputs: tuple, device: torch.device) -> float:
    """Seconds for one forward+backward; CUDA work is timed with events after a synchronize."""
    logits, features, labels, a0, projections = inputs
    z = logits.clone().requires_grad_(True)
    f = features.clone().requires_grad_(True)
    a = a0.clone().requires_grad_(True)
    proj = projections.clone().requires_grad_(True)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        loss_fn(cfg, z, f, labels, a, proj).backward()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    loss_fn(cfg, z, f, labels, a, proj).backward()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--exits", type=int, default=4, metavar="K")
    parser.add_argument("--batch", type=int, default=128, metavar="B")
    parser.add_argument("--classes", type=int, default=100, metavar="C")
    parser.add_argument("--dim", type=int, default=512, metavar="D", help="feature width")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    k, b, c = args.exits, args.batch, args.classes
    logits = (2.0 * torch.randn(k, b, c, generator=g)).to(device)
    features = torch.randn(k, b, args.dim, generator=g).relu().to(device)
    labels = torch.randint(0, c, (b,), generator=g).to(device)
    projections = torch.randn(k - 1, b, args.dim, generator=g).to(device)
    inputs = (logits, features, labels, init_teacher_logits(k, "deeper").to(device), projections)

    print(
        f"{versions('torch')}, device {device}"
        f" ({torch.get_num_threads()} threads), K={k} B={b} C={c} D={args.dim},"
        f" median of {args.repeats} after {args.warmup} warm-up, forward+backward"
    )
    print(f"{'config':<26}{'naive ms':>10}{'batched ms':>12}{'naive/batched':>15}")
    for name, cfg in CONFIGS.items():
        impls = {"naive": naive_mate_loss, "batched": _batched}
        times: dict[str, list[float]] = {key: [] for key in impls}
        for i in range(args.warmup + args.repeats):
            for key, loss_fn in impls.items():
                seconds = _time_step(loss_fn, cfg, inputs, device)
                if i >= args.warmup:
                    times[key].append(seconds)
        naive, batched = (statistics.median(times[key]) * 1e3 for key in impls)
        print(f"{name:<26}{naive:>10.3f}{batched:>12.3f}{naive / batched:>14.2f}x")


if __name__ == "__main__":
    main()
