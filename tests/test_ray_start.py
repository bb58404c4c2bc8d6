"""A local Ray that does not start: `launch` ends with Ray's reason on one line and exit
status 1, and leaves no trace of the sweep it did not run (a real process, a real Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sweep_helpers import short_digits_space, sweep_args

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
