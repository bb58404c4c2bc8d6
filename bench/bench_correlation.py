"""How strong is the correlation term? Its gradient norm against the CE gradient norm.

    python bench/bench_correlation.py [--arch resnet18] [--classes 100] [--epochs 2] [--seeds 3]

On CIFAR-shaped data (the synthetic 32 px set, 100 classes), a multi-exit ResNet-18 with its
projection heads trains with MATE + the correlation term at `--weight`. At initialisation and
after each epoch, on one fixed training batch, the script measures on the parameters both
terms share (backbone and exit heads; the projection heads only see the correlation term)

    ratio = || grad weight * correlation || / || grad sum_k CE(z_k) ||

and prints it per seed with the median and range. The ratio is linear in the weight, so one
run tells where any weight would sit. `loss.correlation_weight`'s recommended value in the
README comes from this measurement.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from _common import machine, versions

from trainer.config import parse_job_config
from trainer.engine import Job, build_job, train_one_epoch
from trainer.losses import correlation_loss


def grad_ratio(job: Job, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """||grad of weight * correlation|| / ||grad of sum_k CE|| on the shared parameters."""
    model = job.model
    shared = [p for name, p in model.named_parameters() if not name.startswith("projectors.")]
    model.train()
    out = model(inputs)
    num_exits = out.logits.shape[0]
    ce = F.cross_entropy(out.logits.flatten(0, 1), labels.repeat(num_exits)) * num_exits
    corr = job.cfg.loss.correlation_weight * correlation_loss(out.projections, out.features[-1])
    ce_grads = torch.autograd.grad(ce, shared, retain_graph=True, allow_unused=True)
    corr_grads = torch.autograd.grad(corr, shared, allow_unused=True)

    def norm(grads) -> float:
        return torch.sqrt(sum(g.square().sum() for g in grads if g is not None)).item()

    return norm(corr_grads) / norm(ce_grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--samples", type=int, default=2048, help="synthetic training images")
    parser.add_argument("--weight", type=float, default=1.0, help="loss.correlation_weight")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    print(versions("torch"))
    print(machine())
    print(
        f"{args.arch}, synthetic 32 px, {args.classes} classes, {args.samples} images, batch 128,"
        f" mate + correlation_weight {args.weight}, sgd lr 0.1, {args.epochs} epochs,"
        f" seeds 0..{args.seeds - 1}, device {args.device}"
    )
    ratios: dict[int, list[float]] = {}
    for seed in range(args.seeds):
        cfg = parse_job_config(
            {
                "dataset": {
                    "name": "synthetic",
                    "num_classes": args.classes,
                    "num_samples": args.samples,
                    "image_size": 32,
                },
                "model": {"arch": args.arch},
                "loss": {"kind": "mate", "correlation_weight": args.weight},
                "optim": {"lr": 0.1},
                "train": {
                    "epochs": args.epochs,
                    "batch_size": 128,
                    "seed": seed,
                    "device": args.device,
                },
            }
        )
        job = build_job(cfg)
        inputs, labels = next(iter(job.loader(job.data.train, train=False)))
        for epoch in range(args.epochs + 1):
            if epoch:
                train_one_epoch(job)
            ratios.setdefault(epoch, []).append(grad_ratio(job, inputs, labels))
    print(f"{'epoch':>5}  {'median ratio':>12}  {'range':>17}  per seed")
    for epoch, values in ratios.items():
        per_seed = " ".join(f"{v:.3f}" for v in values)
        spread = f"{min(values):.3f} - {max(values):.3f}"
        print(f"{epoch:>5}  {statistics.median(values):>12.3f}  {spread:>17}  {per_seed}")


if __name__ == "__main__":
    main()
