"""Methods on CIFAR-10 JPEG: MATE vs DSN, BYOT, EED and Phuong-Lampert at their defaults.

One real sweep through the project: `orchestrate launch` on a generated grid space (Optuna's
GridSampler over `loss.kind` x `train.seed`, no pruning), so every method trains the same
multi-exit resnet20 for the same epochs on the same class-stratified training subset, each
with its reference defaults (docs/losses.md). The trials run on local Ray, one CPU each, two
at a time, and MLflow records them like any sweep. Then `orchestrate compare --by loss.kind
--against dsn` (orchestrator/workflows/compare.py) evaluates each trial's final checkpoint
once on the 10,000 test images and prints the table: per method, test accuracy at each exit,
of the exits' averaged probabilities (ensemble), their mean and the anytime AUC, as mean ±
sample standard deviation over the seeds, and per exit each method's verdict against DSN
(paired by seed: wins or loses beyond twice the standard error of the difference).

The images were re-encoded as JPEG: accuracies differ a little from the pickled CIFAR-10.

    .venv/bin/python bench/bench_methods.py            # 3 seeds, 10% subset, 8 epochs (~52 min)
    .venv/bin/python bench/bench_methods.py --quick    # 1 seed, dsn and mate, 2 epochs
    .venv/bin/python bench/bench_methods.py --kinds dsn mate --seeds 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, versions
from _sweeps import launch_sweep

from orchestrator.rendering.console import console
from orchestrator.rendering.tables import comparison_table
from orchestrator.workflows.compare import compare
from trainer import metrics as M

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cifar10_jpeg import cifar10_jpeg  # the tests' data helper

KINDS = ["dsn", "byot", "eed", "phuong_lampert", "mate"]


def grid_space(root: Path, kinds: list[str], seeds: list[int], args) -> dict:
    """The sweep: every (kind, seed) once on one network, subset and epoch budget."""
    return {
        "base": {
            "dataset": {
                "name": "imagefolder",
                "root": str(root),
                "image_size": 32,
                "val_fraction": args.val_fraction,
                "train_fraction": args.train_fraction,
            },
            "model": {"arch": "resnet20", "exits": [3, 5, 7, 9]},
            "optim": {"name": "sgd", "lr": 0.1, "schedule": "cosine", "weight_decay": 5.0e-4},
            "train": {"epochs": args.epochs, "batch_size": 128, "device": "cpu"},
        },
        "search": {
            "metric": M.MEAN_EXIT_ACC,
            "mode": "max",
            "num_samples": len(kinds) * len(seeds),
            "sampler": {"kind": "grid", "seed": 0},
            "pruner": {"kind": "none"},
            "resources": {"cpu": 1, "gpu": 0},
        },
        "space": {
            "loss.kind": {"type": "categorical", "choices": kinds},
            "train.seed": {"type": "categorical", "choices": seeds},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, dsn and mate, 2 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-fraction", type=float, default=0.1)
    parser.add_argument("--val-fraction", type=float, default=0.02)
    args = parser.parse_args()
    kinds, seeds = (["dsn", "mate"], [0]) if args.quick else (args.kinds, list(range(args.seeds)))
    if args.quick:
        args.epochs, args.train_fraction = 2, 0.02

    work = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    start = time.perf_counter()
    record = launch_sweep(grid_space(cifar10_jpeg(), kinds, seeds, args), work, "methods")
    sweep_minutes = (time.perf_counter() - start) / 60
    comparison = compare(record, "loss.kind", against="dsn" if "dsn" in kinds else None)

    print(versions("torch", "ray", "optuna", "mlflow"))
    print(machine())
    print(
        f"CIFAR-10 JPEG, resnet20 with exits after blocks 3, 5, 7, 9; train_fraction "
        f"{args.train_fraction} of the {1 - args.val_fraction:.0%} not held out for validation, "
        f"{args.epochs} epochs, "
        f"batch 128, SGD lr 0.1 cosine; seeds {seeds}; each kind at its defaults; sweep "
        f"{sweep_minutes:.1f} min, 2 trials at a time; test: 10,000 images"
    )
    console.print(comparison_table(comparison.rows(), comparison.title, width=console.width))
    print("wrote " + ", ".join(str(path) for path in comparison.files))


if __name__ == "__main__":
    main()
