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
settings as orchestrator.sweep._tuner (a ConcurrencyLimiter of 2, reuse_actors, checkpoints,
retries), but no MLflow callback. For each seed (sampler seed = training seed = the seed),
the methods run one after another in a rotating order, so drift in machine load spreads over
all three.

Figures per run, then the median over seeds:
  best full   the highest final-epoch val/mean_exit_acc among trials that ran every epoch of
              the per-trial budget before the sweep budget ran out (what a user would promote;
              "none" when no trial did, counted as the worst)
  best any    the highest val/mean_exit_acc reported at any epoch by any trial
  to ACC      trial-epochs spent (in the order Tune received the results) when a trial first
              reported val/mean_exit_acc >= ACC at any epoch; a seed that never got there
              counts as infinite in the median ("not reached" when most did not)
The TPE sampler's first n_startup_trials (4) proposals are random and, with the same seed,
the same configurations the random method starts with: proposals can differ only after those.
The two pruners share the rungs (1, 2, 4 epochs) but not the rule at a rung: Optuna's
SuccessiveHalvingPruner continues a trial in the top floor(n/2) of the n values recorded there
(at least 1), Ray's ASHA one at or above their median, so of 3 values Optuna keeps 1, ASHA 2.
0.95 is reached by most digits configurations after 5-6 epochs (it measures epochs more than
search); 0.98 is reached by few, so it is the discriminating target.

    .venv/bin/python bench/bench_search.py            # 5 seeds, 8 epochs/trial, 64 trial-epochs
    .venv/bin/python bench/bench_search.py --quick    # 3 seeds, 4 epochs/trial, 16 trial-epochs
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
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
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from orchestrator.cluster import init_ray
from orchestrator.optuna_search import OptunaPruningScheduler, OptunaSearcher, make_sampler
from orchestrator.space import SpaceSpec, decode_params, optuna_distributions, parse_space
from orchestrator.sweep import MAX_FAILURES, trial_dirname, trial_resources
from trainer import metrics as M
from trainer.trainable import train_job

DIGITS_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "mate_digits.yaml"
METHODS = ("ours", "stock", "random")
CONCURRENCY = 2  # trials at a time: 2 CPUs, 1 CPU per trial


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


class Proposals(tune.Callback):
    """The configurations a run's searcher proposed, in the order their trials started."""

    def __init__(self, spec: SpaceSpec) -> None:
        self.spec = spec
        self.configs: list[str] = []

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        config = trial.config
        if "overrides" in config:  # OptunaSearcher
            params = config["overrides"]
        else:  # stock OptunaSearch: flat keys, JSON-encoded list choices
            params = decode_params(self.spec, {key: config[key] for key in self.spec.space})
        rounded = {k: round(v, 6) if isinstance(v, float) else v for k, v in params.items()}
        self.configs.append(json.dumps(rounded, sort_keys=True))


def stock_trial(config: dict, spec: SpaceSpec) -> None:
    """train_job for a stock OptunaSearch config (flat dotted keys, JSON-encoded choices)."""
    params = {key: config[key] for key in spec.space}
    train_job({"job": config["job"], "overrides": decode_params(spec, params)})


def make_tuner(
    method: str, spec: SpaceSpec, stopper: EpochBudget, proposals: Proposals, workdir: str
) -> tune.Tuner:
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
            # As in _tuner: unbounded, Tune keeps one trial of a searcher pending at a time
            # and short trials run one after another.
            search_alg=ConcurrencyLimiter(searcher, CONCURRENCY),
            scheduler=scheduler,
            num_samples=10_000,  # the epoch budget ends the run
            trial_dirname_creator=trial_dirname,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=method,
            storage_path=workdir,
            stop=stopper,
            callbacks=[proposals],
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0,
        ),
    )


@dataclass
class Run:
    best_full: float | None  # None: no trial ran the full per-trial budget
    best_any: float
    to_target: dict[float, float]  # target -> trial-epochs; math.inf when never reached
    trials: int
    full_trials: int
    seconds: float
    proposals: list[str]  # configurations, in trial start order


def trial_epochs_to(results: list[tuple[str, int, float]], target: float) -> float:
    for spent, (_, _, value) in enumerate(results, start=1):
        if value >= target:
            return spent
    return math.inf


def summarize(
    stopper: EpochBudget, proposals: Proposals, max_epochs: int, targets: list[float], secs: float
) -> Run:
    results = stopper.results
    full = [value for _, epoch, value in results if epoch == max_epochs]
    return Run(
        best_full=max(full) if full else None,
        best_any=max(value for _, _, value in results),
        to_target={target: trial_epochs_to(results, target) for target in targets},
        trials=len({trial_id for trial_id, _, _ in results}),
        full_trials=len(full),
        seconds=secs,
        proposals=proposals.configs,
    )


def run_once(method: str, seed: int, args: argparse.Namespace) -> Run:
    spec = digits_spec(seed, args.epochs, method)
    stopper, proposals = EpochBudget(args.budget, spec.search.metric), Proposals(spec)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as workdir:
        start = time.perf_counter()
        make_tuner(method, spec, stopper, proposals, workdir).fit()
        seconds = time.perf_counter() - start
    return summarize(stopper, proposals, spec.max_epochs, args.targets, seconds)


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
        header += f"{f'to {target}':>13}{'reached':>9}"
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
    for other in ("stock", "random"):
        ours, theirs = medians["ours"], medians[other]
        line = (
            f"ours / {other}: best full {ratio(ours['full'], theirs['full'])}, "
            f"best any {ratio(ours['any'], theirs['any'])}"
        )
        for target in targets:
            line += f", trial-epochs to {target} {ratio(ours[target], theirs[target])}"
        print(line)


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
        "--targets",
        type=float,
        nargs="+",
        default=[0.95, 0.98],
        metavar="ACC",
        help="val/mean_exit_acc targets, default 0.95 0.98",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 seeds, 4 epochs/trial, 16 trial-epochs"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.budget = 3, 4, 16
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A checkpoint per epoch forces frequent experiment-state snapshots (num_to_keep=2, as in
    # a sweep); Tune warns about each. The snapshots still happen (bench_overhead times them).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # The trial proposed last never starts once the budget is spent; Tune warns it has no data.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

    print(versions("torch", "ray", "optuna", "mlflow"))
    print(machine())
    print(
        f"digits space, {args.epochs} epochs/trial, budget {args.budget} trial-epochs, "
        f"seeds 0..{args.seeds - 1}, {CONCURRENCY} trials x 1 CPU at a time"
    )
    init_ray(num_cpus=CONCURRENCY, num_gpus=0)
    runs: dict[str, list[Run]] = {method: [] for method in METHODS}
    start = time.perf_counter()
    for seed in range(args.seeds):
        order = METHODS[seed % 3 :] + METHODS[: seed % 3]  # rotate: drift hits all alike
        for method in order:
            run = run_once(method, seed, args)
            runs[method].append(run)
            to = "  ".join(f"to {t} {fmt(run.to_target[t], 'g'):>3}" for t in args.targets)
            print(
                f"  seed {seed} {method:6s} best full {fmt(run.best_full)}  best any "
                f"{run.best_any:.4f}  {to}  trials {run.trials:2d} "
                f"({run.full_trials} full)  {run.seconds:5.1f} s",
                flush=True,
            )
        ours, stock = runs["ours"][-1].proposals, runs["stock"][-1].proposals
        shared = sum(a == b for a, b in zip(ours, stock, strict=False))
        print(
            f"  seed {seed} ours and stock proposed the same configuration for {shared} of the "
            f"first {min(len(ours), len(stock))} trials (position by position)"
        )
    ray.shutdown()
    print(f"{machine()}; {time.perf_counter() - start:.0f} s of runs")
    report(runs, args.targets)


if __name__ == "__main__":
    main()
