"""Scale: thousands of one-second trials on one Tune driver, three ways, against the ideal.

Shaped like Ray Tune's release test ``release/tune_tests/scalability_tests/workloads/
test_bookkeeping_overhead.py`` (ray-project/ray: 10,000 trials of 1 s reporting once per
second on 16 CPUs; 625 s ideal, 715 s published, 800 s gate) and sized for this machine:
`--trials` trials (default 2,000) of `--seconds` seconds each (default 1), one result per
second, on a local Ray that declares 16 CPUs, 1 CPU per trial. The trials sleep: no training.
Three paths run one after another on that Ray, in one invocation:

  bare   Tune as the release test runs it: the default variant generator, no scheduler, no
         callbacks, Tune's own result loggers off, experiment snapshots every 100 s
  stock  Ray's OptunaSearch (the project's TPE settings; Ray's default in-memory study) +
         ASHAScheduler + MLflowLoggerCallback into a throwaway sqlite store, in the sweep's
         Tuner set-up (orchestrator.tuning.tuner.build_tuner, as bench_search.py runs it);
         stopped at `--stock-budget` seconds, its wall time for every trial then projected
  ours   the project's real path, orchestrator.workflows.launch.prepare + launch with the
         training replaced by the sleep: its searcher and pruner on an Optuna study in sqlite,
         the journaled MLflow writer into sqlite, the trial figures, the parent run's summary
         and the report at the end, and the progress line `orchestrate launch` adds

The space is the shipped CIFAR-10 one (search_spaces/mate_cifar10.yaml: TPE, multivariate,
constant liar, a conditional parameter) with `--seconds` epochs per trial, and every trial
reports what a MATE trial of it reports (each exit's metrics, made up from its parameters),
so searchers, scheduler and MLflow callbacks handle results of the real size.

Printed: per path the wall time against the ideal (trials x seconds / 16) and against bare;
where the driver's time went (the searcher's, scheduler's and callbacks' hooks and Tune's
experiment snapshots, timed on the driver; the CPU time of the driver's main thread, of its
other threads, of its child processes that ended (ours: the MLflow writer) and of the whole
machine, Ray's processes included); Optuna's ask latency (a new trial's whole
configuration) per block of trials for stock and ours; and for ours, how long ``orchestrate
status NAME`` and ``orchestrate report NAME`` take on the finished sweep, and the end of
the sweep (the parent run's summary after the writer's last writes, the report).

    .venv/bin/python bench/bench_scale.py                 # 2,000 trials (11 min, idle 2 cores)
    .venv/bin/python bench/bench_scale.py --trials 100    # a smoke run (4 min at load 15)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
import yaml
from _common import machine, timed_methods, versions
from _sweeps import stock_search
from mlflow.tracking import MlflowClient
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.callback import CallbackList
from ray.tune.execution.tune_controller import TuneController
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, SearchGenerator

from orchestrator.entities.space import SpaceSpec, parse_space
from orchestrator.tuning.callbacks.progress import SweepProgress
from orchestrator.tuning.callbacks.report import ReportCallback
from orchestrator.tuning.callbacks.tracking import MlflowTrackingCallback
from orchestrator.tuning.cluster import init_ray
from orchestrator.tuning.scheduler import OptunaPruningScheduler
from orchestrator.tuning.searcher import OptunaSearcher
from orchestrator.tuning.tuner import build_tuner
from orchestrator.workflows.launch import launch, prepare
from trainer import metrics as M

CIFAR10_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "mate_cifar10.yaml"
SLOTS = 16  # CPUs the local Ray declares, as the release test's node has; 1 per trial
PATHS = ("bare", "stock", "ours")
ASK_BLOCKS = 8  # rows of the ask-latency table
# Ray's release test: Tune's experiment snapshots every 100 s, and (here) no result loggers.
BARE_ENV = {"TUNE_GLOBAL_CHECKPOINT_S": "100", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}

# ----------------------------------------------------------------------------- the trials


@dataclass(frozen=True)
class ResultShape:
    """What a trial of the space reports each epoch: the epoch, and every metric a MATE
    trial with that many exits reports (its per-model GFLOPs too), by number of exits."""

    names: dict[int, list[str]]
    base_exits: list[int]


def result_shape(spec: SpaceSpec) -> ResultShape:
    choices = spec.space["model.exits"].choices if "model.exits" in spec.space else []
    counts = {len(spec.base.model.exits), *(len(exits) for exits in choices)}
    names = {
        count: [n for n in M.epoch_metric_names(count, "mate") if n != M.EPOCH]
        + [M.exit_gflops(k) for k in range(1, count + 1)]
        for count in counts
    }
    return ResultShape(names, list(spec.base.model.exits))


def made_up_accuracy(params: Mapping[str, Any]) -> float:
    """A smooth function of the learning rate and temperature (bare: of its `score`)."""
    lr, temperature = float(params.get("optim.lr", 0.08)), float(params.get("loss.temperature", 4))
    score = float(params.get("score", 0.0))
    return 0.9 - 0.02 * math.log(lr / 0.08) ** 2 - 0.002 * (temperature - 4) ** 2 + 0.01 * score


def sleep_trial(config: dict[str, Any], seconds: int, shape: ResultShape) -> None:
    """`seconds` epochs of one second each (a sleep), each reporting a whole epoch's result.
    Runs in Ray's workers: self-contained (this script is pickled by value)."""
    params = config.get("overrides", config)  # ours; stock's flat keys; bare's score
    exits = params.get("model.exits", shape.base_exits)
    exits = len(json.loads(exits) if isinstance(exits, str) else exits)
    final = made_up_accuracy(params)
    for epoch in range(1, seconds + 1):
        time.sleep(1.0)
        value = final * (0.8 + 0.2 * epoch / seconds)
        tune.report({"epoch": epoch, **dict.fromkeys(shape.names[exits], value)})


# ----------------------------------------------------------------------------- measuring


@dataclass
class PathRun:
    name: str
    trials: int  # trials that ran to their end
    wall: float
    driver: dict[str, float]  # label -> seconds on the driver
    main_cpu: float  # CPU seconds of the driver's main thread (Tune's loop)
    other_cpu: float  # CPU seconds of the driver process's other threads
    child_cpu: float  # CPU seconds of the driver's child processes that ended (the writer)
    machine_cpu: float  # CPU seconds the whole machine spent (every process)
    asks: list[float] = field(default_factory=list)  # seconds per ask, in order
    stores: dict[str, float] = field(default_factory=dict)  # ours: status, report, ...
    stopped: bool = False  # stopped at its time budget


def driver_methods(
    scheduler: type, searcher: Sequence[tuple[type, str]], own: Mapping[str, list]
) -> dict[str, list[tuple[type, str]]]:
    """The hooks timed on the driver, by the label printed (indented: part of the one above)."""
    hooks = ("on_trial_add", "on_trial_result", "on_trial_complete", "choose_trial_to_run")
    callbacks = ("on_step_begin", "on_step_end", "on_trial_start", "on_trial_result")
    callbacks += ("on_trial_complete", "on_trial_error", "on_trial_save", "on_checkpoint")
    return {
        "searcher: new trials": [
            (BasicVariantGenerator, "next_trial"),
            (SearchGenerator, "next_trial"),
        ],
        "searcher: results and trial ends": [
            (SearchGenerator, "on_trial_result"),
            (SearchGenerator, "on_trial_complete"),
            (BasicVariantGenerator, "on_trial_complete"),
        ],
        "  of which Optuna asks": list(searcher),
        "scheduler": [(scheduler, name) for name in hooks],
        "callbacks during the sweep": [(CallbackList, name) for name in callbacks],
        **own,
        "callbacks at its end": [(CallbackList, "on_experiment_end")],
        "Tune: experiment-state snapshots": [(TuneController, "checkpoint")],
    }


@contextmanager
def env(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def measure(
    name: str,
    methods: Mapping[str, list[tuple[type, str]]],
    ask_label: str,
    run: Callable[[], int],
) -> PathRun:
    """Time `run()` (returns the trials that ended) with `methods` timed."""
    with timed_methods(methods) as calls:
        main, process = time.thread_time(), time.process_time()
        children, busy = children_cpu(), machine_busy()
        start = time.perf_counter()
        trials = run()
        wall = time.perf_counter() - start
        main, process = time.thread_time() - main, time.process_time() - process
        children, busy = children_cpu() - children, machine_busy() - busy
    driver = {label: sum(calls.get(label, [])) for label, owners in methods.items() if owners}
    cpu = (main, process - main, children, busy)
    return PathRun(name, trials, wall, driver, *cpu, list(calls[ask_label]))


def children_cpu() -> float:
    """CPU seconds of this process's children that have ended and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> float:
    """CPU seconds every core of the machine has spent not idle since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def ended(results: tune.ResultGrid) -> int:
    return sum(1 for r in results if r.metrics and "epoch" in r.metrics)


# ----------------------------------------------------------------------------- the paths


def space_data(args: argparse.Namespace) -> dict[str, Any]:
    data = yaml.safe_load(CIFAR10_SPACE.read_text())
    data["base"]["dataset"] = {"name": "synthetic"}  # never loaded; passes launch's checks
    data["base"]["train"]["epochs"] = args.seconds
    data["search"]["num_samples"] = args.trials
    return data


def run_bare(args: argparse.Namespace, workdir: Path, trainable) -> PathRun:
    def run() -> int:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space={"score": tune.uniform(0.0, 1.0)},  # the release test's
            tune_config=tune.TuneConfig(num_samples=args.trials, reuse_actors=True),
            run_config=tune.RunConfig(name="bare", storage_path=str(workdir), verbose=0),
        )
        return ended(tuner.fit())

    methods = driver_methods(FIFOScheduler, [], {})
    with env(BARE_ENV):
        return measure("bare", methods, "  of which Optuna asks", run)


def run_stock(args: argparse.Namespace, workdir: Path, trainable) -> PathRun:
    data = space_data(args)
    data["search"]["time_budget_s"] = args.stock_budget
    spec = parse_space(data, source="stock")
    tracking_uri = f"sqlite:///{workdir / 'stock-mlflow.db'}"
    MlflowClient(tracking_uri).search_experiments()  # creates the store's tables, untimed

    def run() -> int:
        searcher, scheduler = stock_search(spec)
        callback = MLflowLoggerCallback(tracking_uri=tracking_uri, experiment_name="stock")
        tuner = build_tuner(
            trainable,
            spec,
            gpus=0,
            searcher=searcher,
            scheduler=scheduler,
            max_concurrent=SLOTS,
            name="stock",
            storage_path=str(workdir),
            num_samples=args.trials,
            callbacks=[callback],
        )
        return ended(tuner.fit())

    own = {
        "  of which MLflowLoggerCallback": [
            (MLflowLoggerCallback, name)
            for name in ("log_trial_start", "log_trial_result", "log_trial_end")
        ]
    }
    methods = driver_methods(ASHAScheduler, [(optuna.Study, "ask")], own)
    result = measure("stock", methods, "  of which Optuna asks", run)
    result.stopped = result.trials < args.trials
    return result


def orchestrate_seconds(*words: str) -> float:
    """Wall seconds of one ``orchestrate`` command, as a user runs it."""
    command = [str(Path(sys.executable).with_name("orchestrate")), *words]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "RAY_ADDRESS": ""})
    return time.perf_counter() - start


def run_ours(args: argparse.Namespace, workdir: Path, trainable) -> PathRun:
    path = workdir / "ours.yaml"
    path.write_text(yaml.safe_dump(space_data(args), sort_keys=False))
    spec = parse_space(yaml.safe_load(path.read_text()), source=str(path))
    tracking_uri = f"sqlite:///{workdir / 'ours-mlflow.db'}"
    MlflowClient(tracking_uri).search_experiments()  # creates the store's tables, untimed
    name, storage = f"scale-{args.trials}", workdir / "sweeps"

    def run() -> int:
        with prepare(
            spec, name=name, storage_path=storage, tracking_uri=tracking_uri, gpus=0
        ) as record:
            # As `orchestrate launch` runs it, with its progress line (redrawn on a terminal).
            progress = SweepProgress(args.trials, spec.max_epochs, record.study_storage, name)
            return ended(launch(spec, record, [progress], trainable=trainable))

    own = {
        "  of which MLflow, per trial": [
            (MlflowTrackingCallback, name)
            for name in ("on_trial_start", "on_trial_result", "on_trial_complete")
        ],
    }
    end = {
        "  of which summary + MLflow writer's last writes": [
            (MlflowTrackingCallback, "on_experiment_end")
        ],
        "  of which the report": [(ReportCallback, "on_experiment_end")],
    }
    methods = driver_methods(OptunaPruningScheduler, [(OptunaSearcher, "_new_trial")], own)
    methods = {**methods, **end}
    result = measure("ours", methods, "  of which Optuna asks", run)
    result.stores = {
        f"orchestrate status {name}": orchestrate_seconds(
            "status", name, "--storage", str(storage)
        ),
        f"orchestrate report {name}": orchestrate_seconds(
            "report", name, "--storage", str(storage)
        ),
        "end of the sweep: summary + MLflow writer's last writes": result.driver[
            "  of which summary + MLflow writer's last writes"
        ],
        "end of the sweep: the report": result.driver["  of which the report"],
    }
    return result


RUNNERS = {"bare": run_bare, "stock": run_stock, "ours": run_ours}

# ----------------------------------------------------------------------------- the tables


def wall_table(runs: dict[str, PathRun], args: argparse.Namespace) -> None:
    ideal = args.trials * args.seconds / SLOTS
    bare = runs.get("bare")
    print(f"\n{args.trials} trials x {args.seconds} s, {SLOTS} slots: ideal {ideal:.1f} s")
    print(f"{'path':7}{'trials':>8}{'wall s':>9}{'wall/ideal':>12}{'vs bare':>9}  note")
    for name, r in runs.items():
        wall, note = r.wall, ""
        if r.stopped:  # at its time budget: the same rate for every trial
            wall = r.wall * args.trials / max(r.trials, 1)
            note = f"stopped at {r.wall:.0f} s; wall projected at its rate ({r.trials} trials)"
        versus = f"{wall / bare.wall:8.2f}x" if bare else f"{'-':>9}"
        print(f"{name:7}{r.trials:>8}{wall:>9.1f}{wall / ideal:>11.2f}x{versus}  {note}")


def driver_table(runs: dict[str, PathRun]) -> None:
    print("\nwhere the driver's time went (s, and ms per trial that ended):")
    print(f"  {'':50}" + "".join(f"{name:>18}" for name in runs))
    labels = list(dict.fromkeys(label for r in runs.values() for label in r.driver))
    rows = [(label, {n: r.driver.get(label) for n, r in runs.items()}) for label in labels]
    rows.append(
        ("CPU of the driver's main thread (Tune's loop)", {n: r.main_cpu for n, r in runs.items()})
    )
    rows.append(("CPU of the driver's other threads", {n: r.other_cpu for n, r in runs.items()}))
    children = {n: r.child_cpu for n, r in runs.items()}
    rows.append(("CPU of its child processes (ours: MLflow writer)", children))
    rows.append(("CPU of the whole machine", {n: r.machine_cpu for n, r in runs.items()}))
    for label, cells in rows:
        text = []
        for name, seconds in cells.items():
            if seconds is None:
                text.append(f"{'-':>18}")
            else:
                per = 1e3 * seconds / max(runs[name].trials, 1)
                text.append(f"{seconds:9.1f} {per:6.1f} ms")
        print(f"  {label:50}" + "".join(text))


def ask_table(runs: dict[str, PathRun], trials: int) -> None:
    asking = {name: r.asks for name, r in runs.items() if r.asks}
    if not asking:
        return
    block = max(1, math.ceil(trials / ASK_BLOCKS))
    print(f"\nOptuna ask latency (a new trial's configuration), ms, per block of {block} asks:")
    print(f"  {'asks':>13}" + "".join(f"{f'{name} median':>14}{'p90':>8}" for name in asking))
    for start in range(0, max(len(a) for a in asking.values()), block):
        cells = []
        for asks in asking.values():
            part = asks[start : start + block]
            if len(part) < 2:
                cells.append(f"{'-':>14}{'-':>8}")
                continue
            p90 = statistics.quantiles(part, n=10)[8]
            cells.append(f"{1e3 * statistics.median(part):>14.1f}{1e3 * p90:>8.1f}")
        print(f"  {f'{start + 1}-{start + block}':>13}" + "".join(cells))


def stores_table(runs: dict[str, PathRun]) -> None:
    if "ours" not in runs:
        return
    print("\nours: reading and summarising the finished sweep (s)")
    for label, seconds in runs["ours"].stores.items():
        print(f"  {label:60}{seconds:8.2f}")


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000, metavar="N", help="default 2000")
    parser.add_argument(
        "--seconds", type=int, default=1, metavar="S", help="per trial, one result a second (1)"
    )
    parser.add_argument(
        "--stock-budget",
        type=float,
        default=240.0,
        metavar="S",
        help="stock stops after S seconds and its wall time is projected (default 240)",
    )
    parser.add_argument(
        "--paths", nargs="+", choices=PATHS, default=list(PATHS), help="default: all, in order"
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

    print(versions("ray", "optuna", "mlflow"))
    print(machine())
    init_ray(num_cpus=SLOTS, num_gpus=0)
    runs: dict[str, PathRun] = {}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        workdir = Path(tmp)
        spec = parse_space(space_data(args), source="scale")
        trainable = tune.with_parameters(
            sleep_trial, seconds=args.seconds, shape=result_shape(spec)
        )
        for name in args.paths:
            run = RUNNERS[name](args, workdir, trainable)
            runs[name] = run
            print(f"  {name}: {run.trials} trials in {run.wall:.1f} s; {machine()}", flush=True)
    ray.shutdown()
    wall_table(runs, args)
    driver_table(runs)
    ask_table(runs, args.trials)
    stores_table(runs)
    print(machine())


if __name__ == "__main__":
    main()
