"""Record the learning curves that bench/bench_search.py replays: a grid of real CIFAR-10 runs.

One real sweep through the project (`orchestrate launch`, Optuna's GridSampler, no pruning)
trains every configuration of a grid over the shipped CIFAR-10 space
(search_spaces/mate_cifar10.yaml: MATE on resnet20) for the full per-trial budget, on a
class-stratified training subset sized for two CPU cores. The study's intermediate values
(what each trial reported to Optuna, epoch by epoch) become the table, written with the
grid space so that a replay searches exactly the recorded configurations (the approach of
Syne Tune's blackbox repository and of LCBench). The table holds validation accuracies only,
no images.

    .venv/bin/python bench/record_curves.py            # 24 configurations x 6 epochs (~35 min)
    .venv/bin/python bench/record_curves.py --quick    # 2 configurations x 2 epochs, to try it
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import optuna
import yaml
from _common import machine, versions
from _sweeps import launch_sweep
from replay import CURVES_FILE, config_key

from orchestrator.entities.space import decode_params, parse_space
from trainer import metrics as M

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cifar10_jpeg import cifar10_jpeg  # the tests' data helper

SHIPPED = Path(__file__).resolve().parents[1] / "search_spaces" / "mate_cifar10.yaml"
GRID = {
    "optim.lr": [0.02, 0.05, 0.1, 0.2],
    "loss.temperature": [1.0, 4.0],
    "loss.kd_weight": [0.2, 0.5, 0.8],
}


def grid_space(root: Path, grid: dict[str, list], epochs: int, train_fraction: float) -> dict:
    """The shipped space's base on `root`, every combination of `grid` once, no pruning."""
    data = yaml.safe_load(SHIPPED.read_text())
    data["base"]["dataset"].update(root=str(root), train_fraction=train_fraction, val_fraction=0.04)
    data["base"]["train"].update(epochs=epochs, device="cpu")
    sizes = [len(choices) for choices in grid.values()]
    data["search"].update(
        num_samples=math.prod(sizes),
        sampler={"kind": "grid", "seed": 0},
        pruner={"kind": "none"},
    )
    data["space"] = {key: {"type": "categorical", "choices": c} for key, c in grid.items()}
    return data


def record(space: dict, work: Path) -> dict:
    rec = launch_sweep(space, work, "curves")
    spec = parse_space(space, source=str(rec.space_file))
    study = optuna.load_study(study_name=rec.name, storage=rec.study_storage)
    curves = {}
    for trial in study.trials:
        if trial.state != optuna.trial.TrialState.COMPLETE:
            raise RuntimeError(f"trial {trial.number} is {trial.state.name}: record again")
        values = [trial.intermediate_values[e] for e in sorted(trial.intermediate_values)]
        curves[config_key(decode_params(spec, trial.params))] = values
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 configurations x 2 epochs")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-fraction", type=float, default=0.05)
    parser.add_argument("--output", type=Path, default=CURVES_FILE)
    args = parser.parse_args()
    grid = {"optim.lr": [0.05, 0.1]} if args.quick else GRID
    if args.quick:
        args.epochs, args.train_fraction = 2, 0.02
    space = grid_space(cifar10_jpeg(), grid, args.epochs, args.train_fraction)
    curves = record(space, Path(tempfile.mkdtemp(prefix="record-curves-")))
    space["base"]["dataset"]["root"] = "cifar10-jpeg"  # no path of this machine in the table
    table = {
        "recorded_with": f"{versions('torch', 'ray', 'optuna')}; {machine()}",
        "data": "CIFAR-10 JPEG (re-encoded: accuracies differ a little from the pickled set)",
        "metric": M.MEAN_EXIT_ACC,
        "space": space,
        "curves": curves,
    }
    args.output.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{len(curves)} curves of {args.epochs} epochs -> {args.output}")


if __name__ == "__main__":
    main()
