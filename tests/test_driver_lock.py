"""The sweep's driver lock: one holder at a time, named to the one refused; seen by a probe;
gone with its process however that ends; no guard where the file system has no locks."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from orchestrator.entities.sweep import SweepRecord
from orchestrator.stores.driver_lock import driver_running, driving
from trainer.config import ConfigError


def _record(tmp_path) -> SweepRecord:
    return SweepRecord(
        name="locked",
        storage_path=str(tmp_path),
        tracking_uri="sqlite:///mlflow.db",
        experiment_id="",
        parent_run_id="",
        study_storage="sqlite:///optuna.db",
        gpus=0,
        address=None,
        max_concurrent=None,
        num_samples=1,
        created="2026-12-07T00:00:00",
    )


def test_a_second_holder_is_refused_and_told_who_holds_it(tmp_path):
    record = _record(tmp_path)
    with driving(record), pytest.raises(ConfigError) as refused, driving(record):
        pytest.fail("two holders")
    assert str(refused.value) == (
        f"sweep 'locked' is running (pid {os.getpid()} on {socket.gethostname()}): wait for it "
        "to end, or stop it and `orchestrate resume locked`"
    )
    with driving(record):  # released at the end of the block
        pass


def test_the_probe_sees_a_holder_and_takes_nothing(tmp_path):
    record = _record(tmp_path)
    assert not driver_running(record)  # no lock file yet: nothing created by looking
    assert not (record.directory / "driver.lock").exists()
    with driving(record):
        assert driver_running(record)
        assert driver_running(record)  # the probe left nothing held
    assert not driver_running(record)
    with driving(record):
        pass


def test_the_lock_goes_with_a_killed_process(tmp_path):
    record = _record(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from orchestrator.entities.sweep import SweepRecord
                from orchestrator.stores.driver_lock import driver_running, driving
                with driving(SweepRecord(**{record.__dict__!r})):
                    print("held", flush=True)
                    time.sleep(600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on"), driving(record):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with driving(record):  # SIGKILL left nothing held
        pass


def test_a_file_system_without_locks_runs_unguarded(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with driving(_record(tmp_path)):
        ran.append(True)
    assert ran == [True]
    assert not driver_running(_record(tmp_path))
