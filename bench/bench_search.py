"""Search quality on digits at a fixed budget of trial-epochs: ours vs stock Optuna+ASHA vs random.

Three ways to spend the same budget of trial-epochs (sum over trials of the epochs each one
actually ran) on the shipped digits space (search_spaces/mate_digits.yaml, real training
through trainer.trainable.train_job, 1 CPU per trial, 2 trials at a time):

  ours    OptunaSearcher + OptunaPruningScheduler: TPE proposes, Optuna's successive-halving
          pruner stops trials, a pruned trial is told to Optuna as PRUNED (DESIGN §5)
  stock   Ray's OptunaSearch + ASHAScheduler: the same TPE sampler settings (seed,
          n_startup_trials, multivariate, constant liar) and the same rungs (grace 1,
          reduction factor 2, max_t = epochs per trial); a trial ASHA stops is told to Optuna
          as COMPLETE with its partial-budget value
  random  OptunaSearcher with Optuna's RandomSampler (same seed) and no pruning

Each run ends when its budget is spent (a Tune Stopper counts every epoch reported; the
epochs in flight at that moment are lost and not counted). All three use the same Tuner
settings as orchestrator.sweep._tuner (reuse_actors, checkpoints, retries), but no MLflow
callback. For each seed (sampler seed = training seed = the seed), the methods run one after
another in a rotating order, so drift in machine load spreads over all three.

Figures per run, then the median over seeds:
  best full   the highest final-epoch val/mean_exit_acc among trials that ran every epoch of
              the per-trial budget before the sweep budget ran out (what a user would promote)
  best any    the highest val/mean_exit_acc reported at any epoch by any trial
  to target   trial-epochs spent (in the order Tune received the results) when a trial first
              reported val/mean_exit_acc >= --target at any epoch; the median counts a seed
              that never got there as infinite (the median is "not reached" when most did not)

    .venv/bin/python bench/bench_search.py            # 5 seeds, 8 epochs/trial, 64 trial-epochs
    .venv/bin/python bench/bench_search.py --quick    # 5 seeds, 4 epochs/trial, 20 trial-epochs
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import ray
import yaml
from _common import machine, versions
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from orchestrator.cluster import init_ray
from orchestrator.optuna_search import OptunaPruningScheduler, OptunaSearcher, make_sampler
from orchestrator.space import SpaceSpec, decode_params, optuna_distributions, parse_space
from orchestrator.sweep import MAX_FAILURES, trial_dirname, trial_resources
from trainer import metrics as M
from trainer.trainable import train_job

DIGITS_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "mate_digits.yaml"
METHODS = ("ours", "stock", "random")


def digits_spec(seed: int, max_epochs: int, method: str) -> SpaceSpec:
    """The shipped digits space with this run's seed, per-trial epochs and sampler/pruner."""
    data = yaml.safe_load(DIGITS_SPACE.read_text())
    data["base"]["train"]["seed"] = seed
    data["search"]["sampler"]["seed"] = seed
    data["search"]["pruner"]["max_epochs"] = max_epochs
    if method == "random":
        data["search"]["sampler"]["kind"] = "random"
        data["search"]["pruner"]["kind"] = "none"
    return parse_space(data, source=f"{DIGITS_SPACE.name} (seed {seed}, {method})")


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


def stock_trial(config: dict, spec: SpaceSpec) -> None:
    """train_job for a stock OptunaSearch config (flat dotted keys, JSON-encoded choices)."""
    params = {key: config[key] for key in spec.space}
    train_job({"job": config["job"], "overrides": decode_params(spec, params)})


def make_tuner(method: str, spec: SpaceSpec, stopper: EpochBudget, workdir: str) -> tune.Tuner:
    search = spec.search
    if method == "stock":
        searcher = OptunaSearch(
            space=optuna_distributions(spec),
            metric=search.metric,
            mode=search.mode,
            sampler=make_sampler(spec),
        )
        scheduler = ASHAScheduler(
            time_attr=M.EPOCH,
            metric=search.metric,
            mode=search.mode,
            max_t=spec.max_epochs,
            grace_period=search.pruner.min_resource,
            reduction_factor=search.pruner.reduction_factor,
        )
        trainable = tune.with_parameters(stock_trial, spec=spec)
    else:
        searcher = OptunaSearcher(spec, f"sqlite:///{workdir}/optuna.db", method)
        scheduler = OptunaPruningScheduler(searcher)
        trainable = train_job
    return tune.Tuner(  # as orchestrator.sweep._tuner, with `stop` and without MLflow
        tune.with_resources(trainable, trial_resources(spec, gpus=0)),
        param_space={"job": spec.job_for({}).to_dict()},
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=10_000,  # the epoch budget ends the run
            trial_dirname_creator=trial_dirname,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=method,
            storage_path=workdir,
            stop=stopper,
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0,
        ),
    )


@dataclass
class Run:
    best_full: float | None  # None: no trial ran the full per-trial budget
    best_any: float
    to_target: float  # trial-epochs; math.inf when the target was not reached
    trials: int
    full_trials: int
    seconds: float


def summarize(stopper: EpochBudget, max_epochs: int, target: float, seconds: float) -> Run:
    results = stopper.results
    full = [value for _, epoch, value in results if epoch == max_epochs]
    reached = [i + 1 for i, (_, _, value) in enumerate(results) if value >= target]
    return Run(
        best_full=max(full) if full else None,
        best_any=max(value for _, _, value in results),
        to_target=reached[0] if reached else math.inf,
        trials=len({trial_id for trial_id, _, _ in results}),
        full_trials=len(full),
        seconds=seconds,
    )


def run_once(method: str, seed: int, args: argparse.Namespace) -> Run:
    spec = digits_spec(seed, args.epochs, method)
    stopper = EpochBudget(args.budget, spec.search.metric)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as workdir:
        start = time.perf_counter()
        make_tuner(method, spec, stopper, workdir).fit()
        seconds = time.perf_counter() - start
    return summarize(stopper, spec.max_epochs, args.target, seconds)


def fmt(value: float | None, spec: str = ".4f") -> str:
    if value is None:
        return "none"
    return "not reached" if math.isinf(value) else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, metavar="S", help="default 5")
    parser.add_argument(
        "--epochs", type=int, default=8, metavar="E", help="epochs per trial, default 8"
    )
    parser.add_argument(
        "--budget", type=int, default=64, metavar="B", help="trial-epochs per run, default 64"
    )
    parser.add_argument(
        "--target", type=float, default=0.95, help="val/mean_exit_acc target, default 0.95"
    )
    parser.add_argument("--quick", action="store_true", help="4 epochs/trial, 20 trial-epochs")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.budget = 4, 20
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    print(versions("torch", "ray", "optuna", "mlflow"))
    print(machine())
    print(
        f"digits space, {args.epochs} epochs/trial, budget {args.budget} trial-epochs, "
        f"target {args.target}, seeds 0..{args.seeds - 1}, 2 trials x 1 CPU at a time"
    )
    init_ray(num_cpus=2, num_gpus=0)
    runs: dict[str, list[Run]] = {method: [] for method in METHODS}
    for seed in range(args.seeds):
        order = METHODS[seed % 3 :] + METHODS[: seed % 3]  # rotate: drift hits all alike
        for method in order:
            run = run_once(method, seed, args)
            runs[method].append(run)
            print(
                f"  seed {seed} {method:6s} best full {fmt(run.best_full)}  best any "
                f"{run.best_any:.4f}  to target {fmt(run.to_target, 'g'):>11}  trials "
                f"{run.trials:2d} ({run.full_trials} full)  {run.seconds:5.1f} s",
                flush=True,
            )
    ray.shutdown()

    print(machine())
    print(
        f"{'method':8}{'best full':>11}{'best any':>10}{'to target':>13}{'reached':>9}"
        f"{'trials':>8}{'full':>6}{'s/run':>7}"
    )
    medians = {}
    for method, rs in runs.items():
        full = [r.best_full if r.best_full is not None else -math.inf for r in rs]
        med = {
            "full": statistics.median(full),
            "any": statistics.median(r.best_any for r in rs),
            "target": statistics.median(r.to_target for r in rs),
        }
        medians[method] = med
        reached = sum(not math.isinf(r.to_target) for r in rs)
        print(
            f"{method:8}{fmt(med['full']):>11}{med['any']:>10.4f}{fmt(med['target'], 'g'):>13}"
            f"{reached:>5}/{len(rs):<3}{statistics.median(r.trials for r in rs):>8g}"
            f"{statistics.median(r.full_trials for r in rs):>6g}"
            f"{statistics.median(r.seconds for r in rs):>7.1f}"
        )
    for other in ("stock", "random"):
        ours, theirs = medians["ours"], medians[other]
        ratio = ours["target"] / theirs["target"] if not math.isinf(theirs["target"]) else None
        print(
            f"ours / {other}: best full {ours['full'] / theirs['full']:.3f}x, best any "
            f"{ours['any'] / theirs['any']:.3f}x, trial-epochs to target {fmt(ratio, '.2f')}"
        )


if __name__ == "__main__":
    main()
