"""The sweep's driver lock: one holder at a time, named to the one refused; seen by a probe;
gone with its process however that ends; no guard where the file system has no locks; taken
by a launch before its Ray starts."""

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

from orchestrator.stores.driver_lock import driver_running, driving
from sweep_helpers import short_digits_space
from trainer.config import ConfigError


def test_a_second_holder_is_refused_and_told_who_holds_it(tmp_path):
    directory = tmp_path / "locked"
    with driving(directory), pytest.raises(ConfigError) as refused, driving(directory):
        pytest.fail("two holders")
    assert str(refused.value) == (
        f"sweep 'locked' is running (pid {os.getpid()} on {socket.gethostname()}): wait for it "
        "to end, or stop it and `orchestrate resume locked`"
    )
    with driving(directory):  # released at the end of the block
        pass


def test_the_probe_sees_a_holder_and_takes_nothing(tmp_path):
    directory = tmp_path / "locked"
    assert not driver_running(directory)  # no lock file yet: nothing created by looking
    assert not (directory / "driver.lock").exists()
    with driving(directory):
        assert driver_running(directory)
        assert driver_running(directory)  # the probe left nothing held
    assert not driver_running(directory)
    with driving(directory):
        pass


def test_the_lock_goes_with_a_killed_process(tmp_path):
    directory = tmp_path / "locked"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from pathlib import Path
                from orchestrator.stores.driver_lock import driver_running, driving
                with driving(Path({str(directory)!r})):
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
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on"), driving(directory):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with driving(directory):  # SIGKILL left nothing held
        pass


def test_a_file_system_without_locks_runs_unguarded(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with driving(tmp_path / "locked"):
        ran.append(True)
    assert ran == [True]
    assert not driver_running(tmp_path / "locked")


def test_a_second_launch_of_a_name_is_refused_before_ray_starts(tmp_path):
    """A launch holds the lock from before its Ray starts until its sweep ends; one started
    meanwhile under the same name (its record not written yet) is refused first."""
    space = short_digits_space(tmp_path)
    directory = tmp_path / "sweeps" / "twin"
    second = textwrap.dedent(
        f"""
        import ray
        from orchestrator.entities.space import load_space
        from orchestrator.workflows.launch import prepare
        from trainer.config import ConfigError
        try:
            with prepare(load_space({str(space)!r}), name="twin",
                         storage_path={str(directory.parent)!r},
                         tracking_uri="sqlite:///{tmp_path}/mlflow.db", gpus=0):
                print("prepared")
        except ConfigError as err:
            print(err)
        print("ray started:", ray.is_initialized())
        """
    )
    with driving(directory):  # as a launch of 'twin' that is starting its Ray
        refused = subprocess.run(
            [sys.executable, "-c", second],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "RAY_ADDRESS": ""},
        )
    assert refused.stdout == (
        f"sweep 'twin' is running (pid {os.getpid()} on {socket.gethostname()}): choose "
        "another --name\nray started: False\n"
    ), refused.stderr
    assert sorted(p.name for p in directory.iterdir()) == ["driver.lock"]
