"""A local Ray that does not start, or Ctrl-C while it starts: `launch` ends with one line
(Ray's reason, exit status 1; or the interruption, 130) and leaves no trace of the sweep it
did not run (a real process, a real Ray)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweep_helpers import interruptible, short_digits_space, sweep_args

BIN = Path(sys.executable).parent


def test_a_launch_whose_ray_does_not_start_says_why_and_records_nothing(tmp_path):
    # Ray puts unix sockets in its temp dir, and their paths may not exceed 107 bytes.
    deep = tmp_path / ("r" * 110)
    deep.mkdir()
    space = short_digits_space(tmp_path)
    result = subprocess.run(
        [str(BIN / "orchestrate"), "launch", "--space", str(space), *sweep_args(tmp_path, "s")],
        cwd=tmp_path,
        env={**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(deep)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(
        "Error: a local Ray did not start: validate_socket_filename failed: AF_UNIX path "
        f"length cannot exceed 107 bytes: {deep}/"
    ), result.stderr
    assert result.stderr.endswith("; set RAY_TMPDIR to a shorter directory\n")
    assert result.stderr.count("\n") == 1
    assert list((tmp_path / "sweeps").iterdir()) == []  # not even the driver lock
    assert not (tmp_path / "mlruns").exists()  # the tracking store is created by the sweep


def _processes_naming(text: str) -> list[str]:
    """The command lines of this machine's processes that contain `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):  # a process may end while it is read
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if entry.name.isdigit() and text in command:
                found.append(command)
    return found


def test_ctrl_c_while_the_local_ray_starts_records_nothing(tmp_path):
    space = short_digits_space(tmp_path)
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's sockets live there
    launch = [str(BIN / "orchestrate"), "launch", "--space", str(space)]
    try:
        process = subprocess.Popen(
            interruptible([*launch, *sweep_args(tmp_path, "s")]),
            cwd=tmp_path,
            env={**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lock = tmp_path / "sweeps" / "s" / "driver.lock"
        deadline = time.monotonic() + 60
        while not lock.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.exists(), process.communicate()
        time.sleep(1)  # the request was checked, the lock taken: Ray takes seconds to start
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stderr
        assert stdout == "interrupted before the sweep started; nothing was recorded\n"
        assert stderr == ""  # neither a traceback nor Ray's held log lines
        assert list((tmp_path / "sweeps").iterdir()) == []  # the lock went with the directory
        assert not (tmp_path / "mlruns").exists()
        deadline = time.monotonic() + 30  # Ray's processes end with the driver that began them
        while _processes_naming(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _processes_naming(ray_tmp) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
