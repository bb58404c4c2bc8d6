"""Search quality on recorded CIFAR-10 learning curves at a fixed budget of trial-epochs:
ours vs TPE alone vs Ray's stock OptunaSearch + ASHA vs random search.

The curves (bench/cifar10_curves.json, recorded once by bench/record_curves.py: a grid of
24 configurations of the shipped CIFAR-10 space, MATE on resnet20, each trained for the full
per-trial budget) are replayed through real Ray Tune, Optuna and the project's scheduler: a
replayed trial reports exactly what was recorded for its configuration (bench/replay.py), so
every method pays for an epoch what the real training would, at no training cost. The
methods search the recorded grid (categorical parameters), 1 CPU per trial, 2 at a time:

  ours    OptunaSearcher + OptunaPruningScheduler with the shipped CIFAR-10 settings
          (search_spaces/mate_cifar10.yaml): TPE proposes, Optuna's successive-halving
          pruner stops trials, a pruned trial is told to Optuna as PRUNED (docs/design.md §5)
  tpe     the same TPE without pruning
  stock   Ray's OptunaSearch + ASHAScheduler: the same TPE sampler settings (seed,
          n_startup_trials, multivariate, constant liar) and the same rungs (grace period =
          min_resource, reduction factor, max_t = epochs per trial); a trial ASHA stops is
          told to Optuna as COMPLETE with its partial-budget value
  random  OptunaSearcher with Optuna's RandomSampler (same seed) and no pruning

Each run ends when its budget is spent (a Tune Stopper counts every epoch reported; the
epochs in flight at that moment are lost and not counted). All use the sweep's own Tuner
set-up (orchestrator.tuning.tuner.build_tuner: a ConcurrencyLimiter, here of 2, reuse_actors,
retries), but no MLflow callback. Seeds are the samplers' (the curves were recorded with
training seed 0); for each seed the methods run one after another in a rotating order.

Figures per run, then the median over seeds:
  best full   the highest final-epoch val/mean_exit_acc among trials that ran every epoch of
              the per-trial budget before the sweep budget ran out (what a user would promote;
              "none" when no trial did, counted as the worst)
  best any    the highest val/mean_exit_acc reported at any epoch by any trial
  to ACC      trial-epochs spent (in the order Tune received the results) when a trial first
              reported val/mean_exit_acc >= ACC at any epoch; a seed that never got there
              counts as infinite in the median ("not reached" when most did not)
The default targets are the final values of the grid's third-best and best configurations.

    .venv/bin/python bench/bench_search.py            # 10 seeds, 48 trial-epochs
    .venv/bin/python bench/bench_search.py --quick    # 3 seeds, 18 trial-epochs
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import ray
import replay
import yaml
from _common import machine, versions
from _sweeps import stock_search
from ray import cloudpickle, tune
from replay import CURVES_FILE, Curves, replay_trial

from orchestrator.entities.space import SpaceSpec, decode_params
from orchestrator.tuning.cluster import init_ray
from orchestrator.tuning.scheduler import OptunaPruningScheduler
from orchestrator.tuning.searcher import OptunaSearcher
from orchestrator.tuning.tuner import build_tuner
from trainer import metrics as M

CIFAR10_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "mate_cifar10.yaml"
METHODS = ("ours", "tpe", "stock", "random")
CONCURRENCY = 2  # trials at a time: 2 CPUs, 1 CPU per trial


def replay_spec(
    curves: Curves, seed: int, method: str, rungs: tuple[int, int] | None = None
) -> SpaceSpec:
    """The recorded grid with the shipped CIFAR-10 sampler and pruner (or `rungs`: another
    min_resource and reduction_factor), for this seed and method."""
    shipped = yaml.safe_load(CIFAR10_SPACE.read_text())["search"]
    sampler, pruner = {**shipped["sampler"], "seed": seed}, shipped["pruner"]
    if rungs is not None:
        pruner = {**pruner, "min_resource": rungs[0], "reduction_factor": rungs[1]}
    if method in ("tpe", "random"):
        pruner = {"kind": "none"}
    if method == "random":
        sampler = {"kind": "random", "seed": seed}
    return curves.spec(sampler=sampler, pruner=pruner, num_samples=1)


class EpochBudget(tune.Stopper):
    """Ends the experiment once `budget` trial-epochs have been reported; keeps every result
    as (trial id, epoch, metric) in the order Tune received them."""

    def __init__(self, budget: int, metric: str) -> None:
        self.budget, self.metric = budget, metric
        self.results: list[tuple[str, int, float]] = []
        self._last_epoch: dict[str, int] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        epoch = int(result.get(M.EPOCH, 0))
        # Tune repeats a trial's last result when the trial returns: count each epoch once.
        if epoch > self._last_epoch.get(trial_id, 0) and not self.stop_all():
            self._last_epoch[trial_id] = epoch
            self.results.append((trial_id, epoch, float(result[self.metric])))
        return False

    def stop_all(self) -> bool:
        return len(self.results) >= self.budget


def stock_trial(config: dict, spec: SpaceSpec, curves: Curves) -> None:
    """replay_trial for a stock OptunaSearch config (flat dotted keys, JSON-encoded choices)."""
    params = {key: config[key] for key in spec.space}
    replay_trial({"overrides": decode_params(spec, params)}, curves)


def make_tuner(
    method: str,
    spec: SpaceSpec,
    curves: Curves,
    stopper: EpochBudget,
    workdir: str,
) -> tune.Tuner:
    if method == "stock":
        searcher, scheduler = stock_search(spec)
        trainable = tune.with_parameters(stock_trial, spec=spec, curves=curves)
    else:
        searcher = OptunaSearcher(spec, f"sqlite:///{workdir}/optuna.db", method)
        scheduler = OptunaPruningScheduler(searcher)
        trainable = tune.with_parameters(replay_trial, curves=curves)
    # The sweep's own Tuner set-up (orchestrator.tuning.tuner), with `stop` and no MLflow.
    return build_tuner(
        trainable,
        spec,
        gpus=0,
        searcher=searcher,
        scheduler=scheduler,
        max_concurrent=CONCURRENCY,
        name=method,
        storage_path=workdir,
        num_samples=10_000,  # the epoch budget ends the run
        stop=stopper,
    )


@dataclass
class Run:
    best_full: float | None  # None: no trial ran the full per-trial budget
    best_any: float
    to_target: dict[float, float]  # target -> trial-epochs; math.inf when never reached
    trials: int
    full_trials: int
    seconds: float


def trial_epochs_to(results: list[tuple[str, int, float]], target: float) -> float:
    for spent, (_, _, value) in enumerate(results, start=1):
        if value >= target:
            return spent
    return math.inf


def summarize(stopper: EpochBudget, max_epochs: int, targets: list[float], secs: float) -> Run:
    results = stopper.results
    full = [value for _, epoch, value in results if epoch == max_epochs]
    return Run(
        best_full=max(full) if full else None,
        best_any=max(value for _, _, value in results),
        to_target={target: trial_epochs_to(results, target) for target in targets},
        trials=len({trial_id for trial_id, _, _ in results}),
        full_trials=len(full),
        seconds=secs,
    )


def run_once(method: str, seed: int, curves: Curves, args: argparse.Namespace) -> Run:
    spec = replay_spec(curves, seed, method, args.rungs)
    stopper = EpochBudget(args.budget, spec.search.metric)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as workdir:
        start = time.perf_counter()
        make_tuner(method, spec, curves, stopper, workdir).fit()
        seconds = time.perf_counter() - start
    return summarize(stopper, spec.max_epochs, args.targets, seconds)


def fmt(value: float | None, spec: str = ".4f") -> str:
    if value is None or value == -math.inf:
        return "none"
    return "not reached" if math.isinf(value) else format(value, spec)


def ratio(ours: float, theirs: float) -> str:
    if math.isinf(ours) or math.isinf(theirs):
        return "n/a"
    return f"{ours / theirs:.3f}x"


def report(runs: dict[str, list[Run]], targets: list[float]) -> None:
    med = statistics.median
    header = f"{'method':8}{'best full':>11}{'best any':>10}"
    for target in targets:
        header += f"{f'to {target:.4f}':>13}{'reached':>9}"
    print(header + f"{'trials':>8}{'full':>6}{'s/run':>7}")
    medians: dict[str, dict] = {}
    for method, rs in runs.items():
        m = medians[method] = {
            # A run in which no trial ran the full budget counts as the worst.
            "full": med(-math.inf if r.best_full is None else r.best_full for r in rs),
            "any": med(r.best_any for r in rs),
            **{target: med(r.to_target[target] for r in rs) for target in targets},
        }
        line = f"{method:8}{fmt(m['full']):>11}{m['any']:>10.4f}"
        for target in targets:
            reached = sum(not math.isinf(r.to_target[target]) for r in rs)
            line += f"{fmt(m[target], 'g'):>13}{f'{reached}/{len(rs)}':>9}"
        print(
            line + f"{med(r.trials for r in rs):>8g}{med(r.full_trials for r in rs):>6g}"
            f"{med(r.seconds for r in rs):>7.1f}"
        )
    if "ours" not in runs:
        return
    for other in (m for m in runs if m != "ours"):
        ours, theirs = medians["ours"], medians[other]
        line = (
            f"ours / {other}: best full {ratio(ours['full'], theirs['full'])}, "
            f"best any {ratio(ours['any'], theirs['any'])}"
        )
        for target in targets:
            line += f", trial-epochs to {target:.4f} {ratio(ours[target], theirs[target])}"
        print(line)


def default_targets(curves: Curves) -> list[float]:
    """The final values of the grid's third-best and best configurations."""
    finals = sorted(curve[-1] for curve in curves.curves.values())
    return [finals[-3], finals[-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, metavar="S", help="default 10")
    parser.add_argument(
        "--budget", type=int, default=48, metavar="B", help="trial-epochs per run, default 48"
    )
    parser.add_argument(
        "--targets",
        type=float,
        nargs="+",
        metavar="ACC",
        help="val/mean_exit_acc targets (default: the third-best and best final values)",
    )
    parser.add_argument("--quick", action="store_true", help="3 seeds, 18 trial-epochs")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: all"
    )
    parser.add_argument(
        "--rungs",
        type=int,
        nargs=2,
        metavar=("MIN", "RF"),
        help="min_resource and reduction_factor for ours and stock (default: the shipped ones)",
    )
    parser.add_argument("--curves", type=Path, default=CURVES_FILE, help="the recorded table")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.budget = 3, 18
    curves = Curves.load(args.curves)
    args.targets = args.targets or default_targets(curves)
    epochs = len(next(iter(curves.curves.values())))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The trial proposed last never starts once the budget is spent; Tune warns it has no data.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    cloudpickle.register_pickle_by_value(replay)  # Ray's workers cannot import bench/

    print(versions("ray", "optuna"))
    print(machine())
    print(
        f"{len(curves.curves)} recorded CIFAR-10 configurations x {epochs} epochs, budget "
        f"{args.budget} trial-epochs, seeds 0..{args.seeds - 1}, {CONCURRENCY} trials at a time"
    )
    init_ray(num_cpus=CONCURRENCY, num_gpus=0)
    methods = args.methods
    runs: dict[str, list[Run]] = {method: [] for method in methods}
    start = time.perf_counter()
    for seed in range(args.seeds):
        order = methods[seed % len(methods) :] + methods[: seed % len(methods)]
        for method in order:  # rotated: drift hits all alike
            run = run_once(method, seed, curves, args)
            runs[method].append(run)
            to = "  ".join(f"to {t:.4f} {fmt(run.to_target[t], 'g'):>3}" for t in args.targets)
            print(
                f"  seed {seed} {method:6s} best full {fmt(run.best_full)}  best any "
                f"{run.best_any:.4f}  {to}  trials {run.trials:2d} "
                f"({run.full_trials} full)  {run.seconds:5.1f} s",
                flush=True,
            )
    ray.shutdown()
    print(f"{machine()}; {time.perf_counter() - start:.0f} s of runs")
    report(runs, args.targets)


if __name__ == "__main__":
    main()
