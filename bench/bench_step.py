"""MATE training step vs. the DSN step on the same multi-exit network (CIFAR-shaped batch).

Both steps run the same network (same seed), optimizer and data; they differ only in the
loss (MATE adds the attention weight network over the exits' features, K per-sample ensemble
teachers and K^2 distillation terms; `--teacher-weights static` times the trainable weight
vectors instead). Steps alternate,
so drift in machine speed hits both alike. Target: MATE / DSN <= 1.05. Also prints training
throughput (images per second) for each loss.

    python bench/bench_step.py [--arch resnet18] [--batch-size 128] [--repeats 7] [--device cpu]
    python bench/bench_step.py --arch resnet20 --classes 10 --threads 1   # one CPU core
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine, synchronize, versions
from torch import nn

from trainer.config import LossConfig, ModelConfig
from trainer.losses import init_teacher_logits, multi_exit_loss
from trainer.models import create_model


def make_step(cfg: LossConfig, model_cfg: ModelConfig, classes: int, device: torch.device):
    """One SGD step of `cfg`'s loss on a fresh network (seed 0) with MATE's teacher weights."""
    torch.manual_seed(0)
    attention = cfg.kind == "mate" and cfg.teacher_weights == "attention"
    model = create_model(
        model_cfg, num_classes=classes, in_channels=3, image_size=32, weight_network=attention
    ).to(device)
    teacher = None
    params = list(model.parameters())
    if cfg.kind == "mate" and not attention:
        teacher = nn.Parameter(init_teacher_logits(len(model_cfg.exits), cfg.teacher_init))
        teacher = teacher.to(device)
        params.append(teacher)
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> None:
        out = model(inputs)
        scores = teacher if out.teacher_scores is None else out.teacher_scores
        loss = multi_exit_loss(cfg, out.logits, out.features, labels, scores)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()

    return step


def timed(step, inputs, labels, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step(inputs, labels)
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18", help="backbone, default exits")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--teacher-weights", choices=["attention", "static"], default="attention")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model_cfg = ModelConfig(arch=args.arch)
    inputs = torch.randn(args.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    losses = {
        "dsn": LossConfig(kind="dsn"),
        "mate": LossConfig(kind="mate", teacher_weights=args.teacher_weights),
    }
    steps = {kind: make_step(cfg, model_cfg, args.classes, device) for kind, cfg in losses.items()}

    for _ in range(args.warmup):
        for step in steps.values():
            step(inputs, labels)
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    for _ in range(args.repeats):
        for kind, step in steps.items():
            times[kind].append(timed(step, inputs, labels, device))

    medians = {kind: statistics.median(t) for kind, t in times.items()}
    print(machine())
    print(
        f"{versions('torch')}, device {device}, "
        f"threads {torch.get_num_threads()}, {args.arch} exits {model_cfg.exits}, "
        f"{args.classes} classes, batch {args.batch_size}, median of {args.repeats}, "
        f"MATE teacher weights: {args.teacher_weights}"
    )
    for kind, median in medians.items():
        rate = args.batch_size / median
        print(f"  {kind:5s} step  {median * 1000:9.1f} ms  {rate:8.0f} images/s")
    print(f"  MATE / DSN step time: {medians['mate'] / medians['dsn']:.3f}x (target <= 1.05x)")


if __name__ == "__main__":
    main()
