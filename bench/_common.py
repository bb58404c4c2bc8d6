"""What every bench prints and reuses: the versions line, the machine line, a timed median,
a wait for a GPU's queued work, seconds spent in chosen methods. Nothing here imports Ray or
the orchestrator (the sweep benches share :mod:`_sweeps`), so the benches of the trainer and
the served model run where only torch, the trainer's needs and MLflow are installed.

Importable from the bench scripts only (``python bench/<name>.py`` puts bench/ on sys.path);
Ray workers cannot import it, so trainables defined in a bench must not use it.
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import wraps

import torch

__all__ = [
    "machine",
    "median_seconds",
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
