"""Sweep overhead: wall time of a fixed-work sweep vs. the ideal, and MLflow logging per epoch.

(a) Sweep wall time. 16 trials of identical work (the digits job with one fixed config,
    `--epochs` epochs each, real training through trainer.trainable.train_job) on a local
    Ray with 2 CPUs, 1 CPU per trial, so 2 trials at a time. `ours` is the real product path,
    orchestrator.workflows.launch.prepare + launch: OptunaSearcher (pruner kind none), a
    checkpoint per epoch, MlflowTrackingCallback into a temp sqlite store. `bare` is the floor
    Ray Tune itself sets: the same epochs through trainer.engine.fit with a plain tune.report (no
    checkpoint), Tune's default variant generator, no callback. Ray is started before timing;
    the MLflow store's tables are created before timing (a one-off per store).
      work   the sum over all epochs of the trial-measured `epoch_time_s` (train + evaluate)
      ideal  work / 2 (trials at a time); target: wall <= 1.15x ideal
    Each run is then split into where the two trial slots spent their time (epochs, the rest
    of each iteration inside the trial, idle between iterations; from when each result reached
    the driver and the trial's own time_this_iter_s) and where the Tune driver spent its time
    (instrumented by wrapping driver-side methods of Tune, the searcher and the callback).
    `steady` leaves out the fixed costs of getting each slot's first epoch going and of the
    end: Ray starting the trial actors (a worker process importing torch) dominates them.

(b) MLflow logging per epoch. The per-epoch result dicts of one real 4-exit digits trial (a
    tiny Tuner run records them) are replayed into fresh temp sqlite stores through each
    callback's hooks: our MlflowTrackingCallback.on_trial_result (a journal append on Tune's
    driver, then one log_batch in the writer's process, waited for; the append alone is
    reported too) vs Ray's MLflowLoggerCallback.log_trial_result (one log_metric request per
    numeric key). Ray's is
    fed the same full Tune result dicts (it logs every numeric key, Tune's own included) and,
    separately, the dicts cut down to the metric names ours logs. Ours is then put against a
    real digits epoch (build_job, then train_one_epoch + evaluate, median of 5) at 1 thread,
    as a 1-CPU trial runs it.

    .venv/bin/python bench/bench_overhead.py            # 8 epochs/trial, 3 repeats (~5 min)
    .venv/bin/python bench/bench_overhead.py --quick    # 4 epochs/trial, 1 repeat (~1.5 min)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path

import optuna
import ray
import torch
import yaml
from _common import machine, median_seconds, timed_methods, versions
from mlflow.tracking import MlflowClient
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.execution.tune_controller import TuneController
from ray.tune.utils import flatten_dict

from orchestrator.entities.names import TRIAL_NUMBER
from orchestrator.entities.space import load_space
from orchestrator.entities.sweep import SweepTarget
from orchestrator.stores.tracking.runs import ensure_experiment
from orchestrator.tuning.callbacks.tracking import MlflowTrackingCallback
from orchestrator.tuning.cluster import init_ray
from orchestrator.tuning.searcher import OptunaSearcher
from orchestrator.tuning.tuner import trial_dirname, trial_param_space
from orchestrator.workflows.launch import launch, prepare
from trainer import metrics as M
from trainer.engine import build_job, evaluate, fit, train_one_epoch
from trainer.trainable import job_config_from_trial, train_job

DIGITS_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "mate_digits.yaml"
TRIALS = 16
CONCURRENCY = 2

# ----------------------------------------------------------------------------- (a) sweep


def fixed_space(directory: Path, epochs: int) -> Path:
    """The digits space reduced to one configuration (a one-choice key), no pruning."""
    data = yaml.safe_load(DIGITS_SPACE.read_text())
    data["search"].update(num_samples=TRIALS, max_concurrent=None)
    data["search"]["pruner"] = {"kind": "none", "max_epochs": epochs}
    data["space"] = {"loss.teacher_init": {"type": "categorical", "choices": ["deeper"]}}
    path = directory / "fixed.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def bare_job(config: dict) -> None:
    """The same epochs as train_job with nothing else: no checkpoint, Tune's report only."""
    fit(build_job(job_config_from_trial(config)), on_epoch=tune.report)


# Driver-side methods timed in `ours`, by the label printed (nested labels: part of the one above).
DRIVER_METHODS: dict[str, tuple[type, tuple[str, ...]]] = {
    "Tune: process results": (TuneController, ("_on_training_result",)),
    "  of which MLflow on_trial_result": (MlflowTrackingCallback, ("on_trial_result",)),
    "  of which Optuna report/prune": (OptunaSearcher, ("report",)),
    "Tune: process checkpoints": (TuneController, ("_on_saving_result",)),
    "Tune: experiment-state snapshots": (TuneController, ("checkpoint",)),
    "MLflow: trial start/end, sweep end": (
        MlflowTrackingCallback,
        ("on_trial_start", "on_trial_complete", "on_experiment_end"),
    ),
    "Optuna: suggest/complete": (OptunaSearcher, ("suggest", "on_trial_complete")),
}


class DriverTimers:
    """Seconds the Tune driver spends in chosen methods, and when each result reached it
    (the methods are wrapped while one run is timed)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.fit_start = math.nan
        # (arrival time, trial id, epoch, time_this_iter_s, epoch_time_s) per new epoch
        self.arrivals: list[tuple[float, str, int, float, float]] = []

    def _on_result(self, method: Callable) -> Callable:
        @wraps(method)
        def arrived(controller, trial, result):
            now = time.perf_counter()
            for r in result if isinstance(result, list) else [result]:
                if M.EPOCH_TIME in r:  # not the repeat Tune sends when a trial returns
                    self.arrivals.append(
                        (now, trial.trial_id, r[M.EPOCH], r["time_this_iter_s"], r[M.EPOCH_TIME])
                    )
            return method(controller, trial, result)

        return arrived

    def _on_fit(self, method: Callable) -> Callable:
        @wraps(method)
        def fit_(*args, **kwargs):
            self.fit_start = time.perf_counter()
            return method(*args, **kwargs)

        return fit_

    @contextmanager
    def installed(self):
        patches = [
            (TuneController, "_on_training_result", self._on_result),
            (tune.Tuner, "fit", self._on_fit),
        ]
        originals = []
        for owner, name, wrapper in patches:
            originals.append((owner, name, owner.__dict__[name]))
            setattr(owner, name, wrapper(getattr(owner, name)))
        methods = {
            label: [(owner, name) for name in names]
            for label, (owner, names) in DRIVER_METHODS.items()
        }
        try:
            with timed_methods(methods) as self.calls:
                yield self
        finally:
            for owner, name, method in reversed(originals):
                setattr(owner, name, method)


# Where the trial slots' time went (slot-seconds: CONCURRENCY x wall), in table order.
PARTS = {
    "work": "epochs (train + evaluate)",
    "setup": "sweep setup before Tuner.fit",
    "startup": "Tuner.fit to each slot's first epoch",
    "first": "a trial's first iteration beyond its epoch",
    "rest": "later iterations beyond the epoch",
    "between_epochs": "idle between a trial's epochs",
    "between_trials": "idle between trials on a slot",
    "tail": "after each slot's last epoch",
}


@dataclass
class SweepRun:
    wall: float
    parts: dict[str, float]  # slot-seconds per PARTS key
    driver: dict[str, float] = field(default_factory=dict)
    epochs: int = 0

    @property
    def work(self) -> float:
        return self.parts["work"]

    @property
    def ideal(self) -> float:
        return self.work / CONCURRENCY


def sweep_figures(timers: DriverTimers, start: float, end: float) -> SweepRun:
    """Split the slots' time using when each epoch's result reached the driver and how long
    the trial took for that iteration (time_this_iter_s, measured in the trial)."""
    trials: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for arrival, trial_id, _, iteration, epoch in sorted(timers.arrivals):
        trials[trial_id].append((arrival, iteration, epoch))
    assert len(trials) == TRIALS, f"{len(trials)} trials reported"
    parts = dict.fromkeys(PARTS, 0.0)
    for results in trials.values():
        parts["work"] += sum(epoch for _, _, epoch in results)
        parts["first"] += results[0][1] - results[0][2]
        parts["rest"] += sum(iteration - epoch for _, iteration, epoch in results[1:])
        parts["between_epochs"] += sum(
            (arrival - iteration) - previous
            for (previous, _, _), (arrival, iteration, _) in itertools.pairwise(results)
        )
    begins = sorted(results[0][0] - results[0][1] for results in trials.values())
    ends = sorted(results[-1][0] for results in trials.values())
    parts["setup"] = CONCURRENCY * (timers.fit_start - start)
    parts["startup"] = sum(begin - timers.fit_start for begin in begins[:CONCURRENCY])
    parts["tail"] = sum(end - last for last in ends[-CONCURRENCY:])
    wall = end - start
    parts["between_trials"] = CONCURRENCY * wall - sum(parts.values())
    driver = {label: sum(calls) for label, calls in timers.calls.items()}
    return SweepRun(wall, parts, driver, len(timers.arrivals))


def run_ours(workdir: Path, epochs: int, index: int) -> SweepRun:
    spec = load_space(fixed_space(workdir, epochs))
    tracking_uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    (workdir / "mlruns").mkdir()
    MlflowClient(tracking_uri).search_experiments()  # creates the store's tables, untimed
    with DriverTimers().installed() as timers:
        start = time.perf_counter()
        with prepare(
            spec,
            name=f"overhead-{index}",
            storage_path=workdir / "sweeps",
            tracking_uri=tracking_uri,
            gpus=0,
        ) as record:
            launch(spec, record)
        end = time.perf_counter()
    return sweep_figures(timers, start, end)


def run_bare(workdir: Path, epochs: int, index: int) -> SweepRun:
    spec = load_space(fixed_space(workdir, epochs))
    with DriverTimers().installed() as timers:
        start = time.perf_counter()
        tune.Tuner(
            tune.with_resources(bare_job, {"cpu": 1}),
            param_space=trial_param_space(spec),
            tune_config=tune.TuneConfig(
                num_samples=TRIALS, trial_dirname_creator=trial_dirname, reuse_actors=True
            ),
            run_config=tune.RunConfig(
                name=f"bare-{index}", storage_path=str(workdir / "sweeps"), verbose=0
            ),
        ).fit()
        end = time.perf_counter()
    return sweep_figures(timers, start, end)


def report_sweeps(runs: dict[str, list[SweepRun]], epochs: int) -> None:
    med = statistics.median
    print(
        f"\n(a) {TRIALS} trials x {epochs} epochs of the fixed digits job, {CONCURRENCY} at a "
        f"time x 1 CPU; medians over {len(runs['ours'])} run(s) of each"
    )
    print(f"{'variant':8}{'wall s':>9}{'work s':>9}{'ideal s':>9}{'wall/ideal':>12}{'steady':>9}")
    ratios = {}
    for name, rs in runs.items():
        ratios[name] = med(r.wall / r.ideal for r in rs)
        # Without the fixed costs of getting the first epochs going and of ending the sweep.
        fixed = ("setup", "startup", "tail")
        steady = med((r.wall - sum(r.parts[k] for k in fixed) / CONCURRENCY) / r.ideal for r in rs)
        print(
            f"{name:8}{med(r.wall for r in rs):>9.1f}{med(r.work for r in rs):>9.1f}"
            f"{med(r.ideal for r in rs):>9.1f}{ratios[name]:>11.3f}x{steady:>8.3f}x"
        )
    print(f"ours / bare wall: {ratios['ours'] / ratios['bare']:.3f}x;  target: ours <= 1.15x ideal")
    print("where the trial slots' time went (slot-seconds = 2 x wall; median, s and %):")
    print(f"  {'':44}{'ours':>14}{'bare':>14}")
    for key, label in PARTS.items():
        cells = []
        for rs in runs.values():
            seconds = med(r.parts[key] for r in rs)
            share = med(100 * r.parts[key] / (CONCURRENCY * r.wall) for r in rs)
            cells.append(f"{seconds:7.1f} {share:5.1f}%")
        print(f"  {label:44}{cells[0]:>14}{cells[1]:>14}")
    epochs_total = runs["ours"][0].epochs
    print(f"time in the Tune driver (median s, ms per epoch; {epochs_total} epochs per run):")
    print(f"  {'':42}{'ours':>17}{'bare':>17}")
    for label in DRIVER_METHODS:
        cells = []
        for rs in runs.values():
            seconds = med(r.driver.get(label, 0.0) for r in rs)
            cells.append(f"{seconds:6.2f} s {1e3 * seconds / epochs_total:6.1f} ms")
        print(f"  {label:42}{cells[0]:>17}{cells[1]:>17}")


# ----------------------------------------------------------------------------- (b) MLflow


class ResultRecorder(tune.Callback):
    """Keeps the live Trial and a copy of every result dict the driver receives."""

    def __init__(self) -> None:
        self.trial = None
        self.results: list[dict] = []

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.trial = trial
        self.results.append(copy.deepcopy(result))

    def __getstate__(self) -> dict:  # Tune snapshots callbacks; the records stay here
        return {"trial": None, "results": []}


def record_results(workdir: Path, epochs: int) -> ResultRecorder:
    """One real 4-exit digits trial under Tune; its per-epoch results as callbacks see them."""
    spec = load_space(fixed_space(workdir, epochs))
    recorder = ResultRecorder()
    tune.Tuner(
        tune.with_resources(train_job, {"cpu": 1}),
        param_space=trial_param_space(spec),
        tune_config=tune.TuneConfig(num_samples=1, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name="record", storage_path=str(workdir / "sweeps"), callbacks=[recorder], verbose=0
        ),
    ).fit()
    assert len(recorder.results) == epochs, f"recorded {len(recorder.results)} results"
    return recorder


def fresh_store(directory: Path) -> str:
    directory.mkdir(parents=True)
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the tables, untimed
    return uri


def time_ours(uri: str, trial, results: list[dict], *, driver_only: bool) -> list[float]:
    """Per epoch: the callback's journal append (what Tune's driver waits for) and, unless
    `driver_only`, the background writer's log_batch too (waited for after each epoch)."""
    client = MlflowClient(uri)
    experiment = ensure_experiment(client, "bench", uri)
    parent = client.create_run(experiment).info.run_id
    directory = Path(uri.removeprefix("sqlite:///")).parent
    target = SweepTarget("bench", str(directory), uri, experiment, parent, "sqlite://")
    callback = MlflowTrackingCallback(target, M.MEAN_EXIT_ACC, "max")
    callback.on_trial_start(0, [trial], trial)  # creates the child run and logs params
    callback.writer.flush(60)
    times = []
    for result in results:
        start = time.perf_counter()
        callback.on_trial_result(0, [trial], trial, result)
        if not driver_only:
            callback.writer.flush(60, poll_s=2e-4)  # the default 20 ms would be most of it
        times.append(time.perf_counter() - start)
    callback.writer.close(60)
    return times


def time_ray(uri: str, trial, results: list[dict]) -> list[float]:
    callback = MLflowLoggerCallback(tracking_uri=uri, experiment_name="bench")
    callback.setup()
    callback.log_trial_start(trial)  # creates the run and logs the config, one call per key
    times = []
    for result in results:
        start = time.perf_counter()
        callback.log_trial_result(0, trial, result)
        times.append(time.perf_counter() - start)
    return times


def ours_metric_names(results: list[dict]) -> set[str]:
    """What our callback writes after a trial's first epoch (the first adds the per-exit
    GFLOPs and node tags): the epoch metrics, not Tune's own fields."""
    num_exits = sum(1 for key in results[0] if key.endswith("/gflops"))
    kind = load_space(DIGITS_SPACE).base.loss.kind
    return set(M.epoch_metric_names(num_exits, kind)) - {M.EPOCH}


def numeric_keys(result: dict) -> int:
    """How many values Ray's callback logs from `result` (every numeric leaf)."""
    values = flatten_dict(result).values()
    return sum(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def digits_epoch_seconds(threads: int, repeats: int) -> float:
    """Median seconds of one real digits epoch (train_one_epoch + evaluate) at `threads`."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        job = build_job(load_space(DIGITS_SPACE).job_for({}))
        return median_seconds(lambda: (train_one_epoch(job), evaluate(job, job.data.val)), repeats)
    finally:
        torch.set_num_threads(before)


def bench_logging(workdir: Path, args: argparse.Namespace) -> None:
    recorder = record_results(workdir, args.log_epochs)
    trial, full = recorder.trial, recorder.results
    trial.config[TRIAL_NUMBER] = 0  # as our searcher's trials carry (runs are per number)
    names = ours_metric_names(full)
    # Ray's callback needs training_iteration (its step), and logs it as a metric as well.
    keep = names | {"training_iteration"}
    trimmed = [{k: v for k, v in r.items() if k in keep} for r in full]
    methods = {
        "ours (log_batch)": lambda uri: time_ours(uri, trial, full, driver_only=False),
        "ours, of it on Tune's driver (journal)": lambda uri: time_ours(
            uri, trial, full, driver_only=True
        ),
        "Ray MLflowLoggerCallback, full results": lambda uri: time_ray(uri, trial, full),
        "Ray MLflowLoggerCallback, our metrics only": lambda uri: time_ray(uri, trial, trimmed),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    stores = 0
    for repeat in range(args.log_repeats):
        names_in_order = list(methods)
        shift = repeat % len(names_in_order)  # rotate: drift hits all alike
        for name in names_in_order[shift:] + names_in_order[:shift]:
            stores += 1
            uri = fresh_store(workdir / "stores" / str(stores))
            times[name].extend(methods[name](uri))
    epoch_1 = digits_epoch_seconds(1, 5)
    epoch_all = digits_epoch_seconds(torch.get_num_threads(), 5)

    keys = {
        "ours (log_batch)": len(names & set(full[1])),
        "ours, of it on Tune's driver (journal)": len(names & set(full[1])),
        "Ray MLflowLoggerCallback, full results": numeric_keys(full[1]),
        "Ray MLflowLoggerCallback, our metrics only": numeric_keys(trimmed[1]),
    }
    print(
        f"\n(b) MLflow logging per epoch: {len(full)} real result dicts x "
        f"{args.log_repeats} fresh sqlite stores per callback; median ms per epoch"
    )
    print(f"{'callback':44}{'values/epoch':>13}{'ms/epoch':>10}{'vs ours':>9}")
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ours = med["ours (log_batch)"]
    for name, ms in med.items():
        print(f"{name:44}{keys[name]:>13}{ms:>10.2f}{ms / ours:>8.1f}x")
    print(
        f"real digits epoch (train + evaluate): {epoch_1 * 1e3:.0f} ms at 1 thread (as a "
        f"1-CPU trial), {epoch_all * 1e3:.0f} ms at {torch.get_num_threads()} threads"
    )
    print(
        f"ours per epoch = {100 * ours / (epoch_1 * 1e3):.2f}% of a 1-thread digits epoch, "
        f"{100 * ours / (epoch_all * 1e3):.2f}% at {torch.get_num_threads()} threads "
        f"(target < 1%); of a 10-20 s CIFAR ResNet-18 GPU epoch: "
        f"{100 * ours / 20e3:.3f}-{100 * ours / 10e3:.3f}%"
    )


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=8, metavar="E", help="epochs per trial in (a), default 8"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, metavar="R", help="runs of each variant, default 3"
    )
    parser.add_argument(
        "--log-epochs", type=int, default=8, metavar="E", help="results replayed in (b), default 8"
    )
    parser.add_argument(
        "--log-repeats", type=int, default=5, metavar="R", help="stores per callback, default 5"
    )
    parser.add_argument("--only", choices=["sweep", "logging"], help="run only (a) or (b)")
    parser.add_argument("--quick", action="store_true", help="4 epochs, 1 repeat, 3 stores")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.repeats, args.log_repeats = 4, 1, 3
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A checkpoint per epoch forces frequent experiment-state snapshots; Tune warns about each.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    print(versions("torch", "ray", "optuna", "mlflow"))
    print(machine())
    init_ray(num_cpus=CONCURRENCY, num_gpus=0)
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        workdir = Path(tmp)
        if args.only != "logging":
            runs: dict[str, list[SweepRun]] = {"ours": [], "bare": []}
            for repeat in range(args.repeats):
                for name in ("ours", "bare") if repeat % 2 == 0 else ("bare", "ours"):
                    directory = workdir / f"{name}-{repeat}"
                    directory.mkdir()
                    runner = run_ours if name == "ours" else run_bare
                    run = runner(directory, args.epochs, repeat)
                    runs[name].append(run)
                    print(
                        f"  {name:5} run {repeat}: wall {run.wall:6.1f} s, ideal "
                        f"{run.ideal:6.1f} s, {run.wall / run.ideal:.3f}x",
                        flush=True,
                    )
            report_sweeps(runs, args.epochs)
        if args.only != "sweep":
            bench_logging(workdir, args)
    ray.shutdown()
    print(machine())


if __name__ == "__main__":
    main()
