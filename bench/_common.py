"""What every bench prints and reuses: the versions line, the machine line, a timed median,
seconds spent in chosen methods.

Importable from the bench scripts only (``python bench/<name>.py`` puts bench/ on sys.path);
Ray workers cannot import it, so trainables defined in a bench must not use it.
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import wraps
from pathlib import Path

import torch
import yaml
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from orchestrator.entities.space import SpaceSpec
from orchestrator.entities.sweep import SweepRecord
from orchestrator.stores.study import make_sampler, optuna_distributions
from trainer import metrics as M

__all__ = [
    "launch_sweep",
    "machine",
    "median_seconds",
    "stock_search",
    "synchronize",
    "timed_methods",
    "versions",
]


def versions(*modules: str) -> str:
    """``python 3.12.3, torch 2.14.1, ...`` for the named (importable) modules."""
    found = [f"python {platform.python_version()}"]
    for name in modules:
        found.append(f"{name} {importlib.import_module(name).__version__}")
    return ", ".join(found)


def machine() -> str:
    """CPU model, core count and the 1/5/15-minute load average (other work on the machine)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load}"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA runs it asynchronously); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def timed_methods(
    methods: Mapping[str, Sequence[tuple[type, str]]],
) -> Iterator[dict[str, list[float]]]:
    """The seconds of every call, on any thread, to each label's methods (``{label: [(class,
    method name), ...]}``) while the block runs: the methods are wrapped on their classes, then
    restored. A method nested in another labelled one counts in both."""
    calls: dict[str, list[float]] = defaultdict(list)

    def wrap(label: str, method: Callable) -> Callable:
        @wraps(method)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                calls[label].append(time.perf_counter() - start)

        return timed

    originals = []
    for label, owners in methods.items():
        for owner, name in owners:
            originals.append((owner, name, owner.__dict__.get(name)))  # None: inherited
            setattr(owner, name, wrap(label, getattr(owner, name)))
    try:
        yield calls
    finally:
        for owner, name, method in reversed(originals):
            if method is None:
                delattr(owner, name)
            else:
                setattr(owner, name, method)


def launch_sweep(space: dict, work: Path, name: str) -> SweepRecord:
    """Run `space` as a real sweep through `orchestrate launch` on a local Ray, its stores in
    `work`; the sweep's record once it has ended."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    command = [str(Path(sys.executable).with_name("orchestrate")), "launch"]
    command += ["--space", str(path), "--name", name, "--storage", str(work / "sweeps")]
    command += ["--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    subprocess.run(command, cwd=work, check=True, env={**os.environ, "RAY_ADDRESS": ""})
    return SweepRecord.load(name, work / "sweeps")


def stock_search(spec: SpaceSpec) -> tuple[OptunaSearch, ASHAScheduler]:
    """Ray's stock OptunaSearch (the space's sampler) and ASHAScheduler (its pruner's
    settings), as a Tune user would set them up for `spec`."""
    search = spec.search
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
    return searcher, scheduler
