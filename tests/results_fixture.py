"""One small multi-objective digits sweep, run once per session by a real `orchestrate launch`
in a subprocess, shared by the report, figures, dashboard and browser tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from orchestrator.entities.sweep import SweepRecord
from sweep_helpers import DIGITS_SPACE, sweep_args

NAME = "results"
NUM_SAMPLES = 4
MAX_EPOCHS = 2
OBJECTIVES = ["val/mean_exit_acc", "val/anytime_gflops"]
ORCHESTRATE = Path(sys.executable).with_name("orchestrate")


@dataclass(frozen=True)
class ResultsSweep:
    workdir: Path
    record: SweepRecord
    space: Path
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 90.0) -> bytes:
    """The body at `url` once the server in `process` answers it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def results_sweep(tmp_path_factory) -> ResultsSweep:
    """4 trials x 2 epochs over [val/mean_exit_acc (max), val/anytime_gflops (min)], the
    pruner left in the space file (it cannot apply, and launching says so)."""
    workdir = tmp_path_factory.mktemp("results")
    data = yaml.safe_load(DIGITS_SPACE.read_text())
    data["search"].update(metric=OBJECTIVES, mode=["max", "min"], num_samples=NUM_SAMPLES)
    data["search"]["pruner"]["max_epochs"] = MAX_EPOCHS
    space = workdir / "digits_pareto.yaml"
    space.write_text(yaml.safe_dump(data))
    env = {**os.environ, "COLUMNS": "200"}  # one table row per line
    done = subprocess.run(
        [str(ORCHESTRATE), "launch", "--space", str(space), *sweep_args(workdir, NAME)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = SweepRecord.load(NAME, workdir / "sweeps")
    return ResultsSweep(workdir, record, space, done.stdout, done.stderr)
