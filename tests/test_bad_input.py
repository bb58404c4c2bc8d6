"""The malformed-input corpus (tests/bad_inputs.yaml) against a real earlier sweep's stores
(the results sweep the session shares, tests/results_fixture.py).

Each case runs in-process (click's runner) with Ray not running and a Ray temp dir of its
own, and must end with one line and exit status 2 within seconds, start no Ray (no temp
dir, no child process, `ray.is_initialized()` false), and leave every byte the earlier
sweep recorded (sweep directory, MLflow sqlite store and artifacts, Optuna study) and the
case's own directory as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from pathlib import Path
from string import Template

import pytest
import ray
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.tuning.cluster import init_ray
from results_fixture import ResultsSweep
from sweep_helpers import DIGITS_SPACE

CORPUS = yaml.safe_load((Path(__file__).with_name("bad_inputs.yaml")).read_text())
SECONDS = 15.0  # per case, on two shared cores; the slowest case waits ~5 s for a Ray probe
STORE_COMMANDS = ("launch", "resume", "status", "promote")
NOBODY = 65534


@pytest.fixture(scope="module")
def earlier(results_sweep: ResultsSweep):
    """The session's finished results sweep (own process, own Ray); yields its stores'
    places. Ray is stopped while the cases run (they must see none)."""
    if ray.is_initialized():  # another module's Ray: the cases must see none running
        ray.shutdown()
        restart = True
    else:
        restart = False
    record = results_sweep.record
    stores = {
        "storage": str(record.storage_path),
        "tracking": record.tracking_uri,
        "study": record.study_storage,
        "earlier": record.name,
    }
    yield results_sweep.workdir, stores
    if restart:
        init_ray(num_cpus=2, num_gpus=0)


def _digest(root: Path) -> dict[str, str]:
    """Every file under `root` -> its sha256; a SQLite database's is that of its rows (an SQL
    dump), and its write-ahead log and shared-memory index are left out: a reader may rewrite
    them, or fold the log into the database, without changing a row (the dump holds both)."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.endswith(("-wal", "-shm")):
            continue
        data = path.read_bytes()
        if data.startswith(b"SQLite format 3\0"):
            with contextlib.closing(sqlite3.connect(path)) as db:
                data = "\n".join(db.iterdump()).encode()
        digests[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return digests


def _children() -> set[int]:
    """Live child processes of this process."""
    me = str(os.getpid())
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
            if fields.get("PPid", "").strip() == me:
                found.add(int(status.parent.name))
    return found


def _set(data: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for part in parents:
        data = data.setdefault(part, {})
    if value is None:
        data.pop(leaf, None)
    else:
        data[leaf] = value


def _prepare(case: dict, tmp: Path, stores: dict[str, str]) -> list[str]:
    """Write the case's files; its command line with placeholders filled in."""
    fill = {**stores, "tmp": str(tmp), "space": str(tmp / "space.yaml")}

    def sub(value):
        if isinstance(value, str):
            return Template(value).safe_substitute(fill)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        return [sub(v) for v in value] if isinstance(value, list) else value

    space = yaml.safe_load(DIGITS_SPACE.read_text())
    for path, value in sub(case.get("space", {})).items():
        _set(space, path, value)
    (tmp / "space.yaml").write_text(yaml.safe_dump(space))
    for name, text in sub(case.get("files", {})).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    if case.get("file_kind") == "directory":
        (tmp / "input.yaml").mkdir()
    elif case.get("file_kind") == "unreadable":
        (tmp / "input.yaml").write_text("base: {}\n")
        (tmp / "input.yaml").chmod(0)
    args = sub(case["args"])
    if args[0] in STORE_COMMANDS and "--storage" not in args:
        args += ["--storage", stores["storage"]]
    if args[0] == "launch":
        args += [] if "--tracking-uri" in args else ["--tracking-uri", stores["tracking"]]
        args += [] if "--name" in args else ["--name", "bad-input"]
    return args


@contextlib.contextmanager
def _privileges(case: dict):
    """Root reads any file: an `unreadable` case runs as nobody (effective uid only)."""
    drop = case.get("file_kind") == "unreadable" and os.geteuid() == 0
    if drop:
        os.seteuid(NOBODY)
    try:
        yield
    finally:
        if drop:
            os.seteuid(0)


def test_corpus_is_large_and_unique():
    ids = [case["id"] for case in CORPUS]
    assert len(ids) >= 40
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CORPUS, ids=[case["id"] for case in CORPUS])
def test_bad_input_is_one_line_and_exit_2(case, earlier, tmp_path, monkeypatch):
    workdir, stores = earlier
    for name in ("MLFLOW_TRACKING_URI", "MATE_STUDY_STORAGE", "MATE_SWEEP_STORAGE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    ray_dir = tmp_path.parent / f"{tmp_path.name}-ray"
    monkeypatch.setenv("RAY_TMPDIR", str(ray_dir))
    monkeypatch.chdir(tmp_path)
    args = _prepare(case, tmp_path, stores)
    recorded, inputs, children = _digest(workdir), _digest(tmp_path), _children()

    start = time.monotonic()
    with _privileges(case):
        result = CliRunner().invoke(main, args)
    elapsed = time.monotonic() - start

    output = result.output
    assert result.exit_code == 2, output
    assert output.count("\n") == 1 and output.startswith("Error: "), output
    assert Template(case["expect"]).safe_substitute(stores, tmp=tmp_path) in output
    assert "Traceback" not in output
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    assert not ray.is_initialized() and not ray_dir.exists(), "Ray was started"
    assert _children() <= children, "a process was left running"
    assert _digest(workdir) == recorded, "the earlier sweep's record changed"
    assert _digest(tmp_path) == inputs, "the case's directory changed"
