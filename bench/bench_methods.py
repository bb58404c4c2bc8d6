"""Methods on CIFAR-10 JPEG: MATE vs DSN, BYOT, EED and Phuong-Lampert at their defaults.

One real sweep through the project: `orchestrate launch` on a generated grid space (Optuna's
GridSampler over `loss.kind` x `train.seed`, no pruning), so every method trains the same
multi-exit resnet20 for the same epochs on the same class-stratified training subset, each
with its reference defaults (README, "Loss defaults"). The trials run on local Ray, one CPU
each, two at a time, and MLflow records them like any sweep. Afterwards each trial's final
checkpoint (Tune's, in the sweep directory) is evaluated once on the 10,000 test images.

Per method: test accuracy at each exit, of the exits' averaged probabilities (ensemble) and
the anytime AUC (accuracy against relative cost over confidence thresholds), as mean and
sample standard deviation over the seeds. Then, per exit, MATE against each baseline: "wins"
or "loses" when the difference of the means exceeds twice its standard error over the seeds
(sqrt(s1^2/n + s2^2/n)), else "ties".

The images were re-encoded as JPEG: accuracies differ a little from the pickled CIFAR-10.

    .venv/bin/python bench/bench_methods.py            # 3 seeds, 10% subset, 8 epochs (~52 min)
    .venv/bin/python bench/bench_methods.py --quick    # 1 seed, dsn and mate, 2 epochs
    .venv/bin/python bench/bench_methods.py --kinds dsn mate --seeds 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import launch_sweep, machine, versions
from mlflow.tracking import MlflowClient

from trainer import metrics as M
from trainer.engine import build_job, evaluate, load_checkpoint
from trainer.trainable import job_config_from_trial

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


def evaluate_on_test(trial_dir: Path) -> tuple[str, int, dict[str, float]]:
    """(kind, seed, test metrics) of a trial's final checkpoint."""
    config = json.loads((trial_dir / "params.json").read_text())
    job = build_job(job_config_from_trial(config))
    last = max(trial_dir.glob("checkpoint_*"))
    load_checkpoint(job, last)
    if job.epoch != job.cfg.train.epochs:
        raise RuntimeError(f"{last} is from epoch {job.epoch} of {job.cfg.train.epochs}")
    return job.cfg.loss.kind, job.cfg.train.seed, evaluate(job, job.data.test, "test")


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(ours: list[float], theirs: list[float]) -> str:
    (m1, s1), (m2, s2) = _stats(ours), _stats(theirs)
    margin = 2 * math.sqrt(s1**2 / len(ours) + s2**2 / len(theirs))
    if m1 - m2 > margin:
        return "wins"
    return "loses" if m2 - m1 > margin else "ties"


def report(results: list[tuple[str, int, dict[str, float]]], kinds: list[str], exits: int) -> None:
    columns = [*(M.exit_acc(k, "test") for k in range(1, exits + 1))]
    columns += [M.with_split(M.ENSEMBLE_ACC, "test"), M.with_split(M.ANYTIME_AUC, "test")]
    by_kind = {kind: [r for k, _, r in results if k == kind] for kind in kinds}
    heads = [*(f"exit {k}" for k in range(1, exits + 1)), "ensemble", "anytime AUC"]
    print(f"{'method':16}" + "".join(f"{h:>16}" for h in heads))
    for kind in kinds:
        cells = [_stats([r[c] for r in by_kind[kind]]) for c in columns]
        print(f"{kind:16}" + "".join(f"{m:>9.4f} ± {s:.4f}" for m, s in cells))
    if "mate" not in kinds or len(by_kind["mate"]) < 2:
        return  # no verdict from one seed
    for c, head in zip(columns, heads, strict=True):
        mate = [r[c] for r in by_kind["mate"]]
        others = [
            f"{verdict(mate, [r[c] for r in by_kind[k]])} vs {k}" for k in kinds if k != "mate"
        ]
        print(f"MATE at {head}: " + ", ".join(others))


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

    root = cifar10_jpeg()
    work = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    start = time.perf_counter()
    record = launch_sweep(grid_space(root, kinds, seeds, args), work, "methods")
    sweep_minutes = (time.perf_counter() - start) / 60
    trial_dirs = sorted(record.directory.glob("trial_*"))
    results = [evaluate_on_test(d) for d in trial_dirs]
    runs = MlflowClient(record.tracking_uri).search_runs([record.experiment_id])
    finished = sum(
        r.info.status == "FINISHED" for r in runs if r.info.run_id != record.parent_run_id
    )

    print(versions("torch", "ray", "optuna", "mlflow"))
    print(machine())
    print(
        f"CIFAR-10 JPEG, resnet20 with exits after blocks 3, 5, 7, 9; train_fraction "
        f"{args.train_fraction} of the 90% not held out for validation, {args.epochs} epochs, "
        f"batch 128, SGD lr 0.1 cosine; seeds {seeds}; each kind at its defaults"
    )
    print(
        f"sweep: {len(trial_dirs)} trials ({finished} MLflow runs FINISHED) in "
        f"{sweep_minutes:.1f} min, 2 at a time; test: 10,000 images; mean ± std over seeds"
    )
    report(results, kinds, exits=4)


if __name__ == "__main__":
    main()
