"""Faults a long sweep must survive, injected into one real sweep (real processes, no mocks).

`orchestrate launch` runs 4 digits trials (seeded random sampling) against a real
`mlflow server` on 127.0.0.1 with a PostgreSQL backend and served artifacts:

- trial 2 has weight decay 1e8: its loss becomes NaN in epoch 1;
- trial 3 asks for device cuda:99: its code raises before training;
- trial 0's worker process is SIGKILLed by pid after its first epoch; Ray retries the
  trial from that epoch's checkpoint on a new worker;
- at the same moment the MLflow server is killed (SIGKILL of its process group); it stays
  down until the trials have reported two more epochs (to Optuna, which is not down), then
  starts again on the same port.

The tests read the result back from Optuna, MLflow, Tune's trial directories and `status`.

A second sweep (4 digits trials of 3 epochs, TPE and pruning as shipped) keeps its Optuna
study in a throwaway PostgreSQL cluster, stopped with ``pg_ctl stop -m fast`` once the study
has an epoch and started again two trial epochs (at least 10 s) later.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import requests
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.entities.sweep import SweepRecord
from sweep_helpers import (
    DIGITS_SPACE,
    child_runs,
    postgres_databases,
    ray_temp_dir,
    short_digits_space,
    study_trials,
    sweep_args,
)
from trainer import metrics as M

pytestmark = pytest.mark.slow

State = optuna.trial.TrialState
BIN = Path(sys.executable).parent


def _start(command: list[str], workdir: Path, ray_dir: str) -> subprocess.Popen:
    """`orchestrate launch` in its own process on a local Ray under `ray_dir`."""
    return subprocess.Popen(
        command,
        cwd=workdir,
        env={**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_dir},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


EPOCHS = 4
NUM_SAMPLES = 4
SEED = 4  # random sampling gives: trial 0 and 1 clean, 2 NaN, 3 cuda:99
HUGE_DECAY, BAD_DEVICE = 1.0e8, "cuda:99"
TIMEOUT = 300  # s, for the whole sweep
SERVER_START_TIMEOUT = 90


def _space(directory: Path) -> Path:
    data = yaml.safe_load(DIGITS_SPACE.read_text())
    data["base"]["model"]["exits"] = [2, 4]
    data["base"]["train"]["epochs"] = EPOCHS
    data["search"] |= {
        "num_samples": NUM_SAMPLES,
        "sampler": {"kind": "random", "seed": SEED},
        "pruner": {"kind": "none"},
    }
    data["space"] = {
        "optim.weight_decay": {"type": "categorical", "choices": [5.0e-4, HUGE_DECAY]},
        "train.device": {"type": "categorical", "choices": ["cpu", BAD_DEVICE]},
    }
    path = directory / "faults.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in a process group of its own."""

    def __init__(self, backend: str, artifacts: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend, self.artifacts, self.log = backend, artifacts, log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--workers", "1", "--artifacts-destination", str(self.artifacts)]
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": self.backend}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not self.up():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def up(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=1).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """SIGKILL the server's process group: down at once, no goodbye to its clients."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def _trial_dirs(sweep_dir: Path) -> dict[int, Path]:
    """Optuna trial number -> Tune trial directory."""
    found = {}
    for params in sweep_dir.glob("trial_*/params.json"):
        found[json.loads(params.read_text())["optuna_trial_number"]] = params.parent
    return found


def _results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _reported_epochs(record_dir: Path) -> int:
    """Epochs all trials have reported to the study so far."""
    if not (record_dir / "sweep.json").exists():  # the study is created just before
        return 0
    storage = f"sqlite:///{record_dir / 'optuna.db'}"
    trials = optuna.load_study(study_name=record_dir.name, storage=storage).trials
    return sum(len(t.intermediate_values) for t in trials)


def _wait(condition, process: subprocess.Popen, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert process.poll() is None, f"launch ended before {what}: {process.stdout.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


@pytest.fixture(scope="module")
def faulty_sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults")
    with postgres_databases("mlflow") as (backend,), ray_temp_dir() as ray_dir:
        server = MlflowServer(backend, workdir / "artifacts", workdir / "mlflow-server.log")
        try:
            yield _run_with_faults(workdir, server, ray_dir)
        finally:
            server.stop()


def _run_with_faults(workdir: Path, server: MlflowServer, ray_dir: str) -> dict:
    """Launch the sweep, inject the faults, wait for the end; what the tests need."""
    server.start()
    command = [str(BIN / "orchestrate"), "launch", "--space", str(_space(workdir))]
    command += ["--name", "faults", "--storage", str(workdir / "sweeps")]
    command += ["--tracking-uri", server.url]
    launch = _start(command, workdir, ray_dir)
    sweep_dir = workdir / "sweeps" / "faults"
    try:
        victim = _wait(lambda: _trial_dirs(sweep_dir).get(0), launch, "trial 0")
        first = _wait(lambda: _results(victim)[:1], launch, "trial 0's first epoch")[0]
        down_at = _reported_epochs(sweep_dir)
        os.kill(first["pid"], signal.SIGKILL)
        server.stop()
        _wait(
            lambda: _reported_epochs(sweep_dir) >= down_at + 2 or launch.poll() is not None,
            launch,
            "epochs during the outage",
        )
        during_outage = _reported_epochs(sweep_dir) - down_at
        server.start()
        output, _ = launch.communicate(timeout=TIMEOUT)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 0, output
    storage = ["--storage", str(workdir / "sweeps")]
    return {
        "record": SweepRecord.load("faults", workdir / "sweeps"),
        "status": CliRunner().invoke(main, ["status", "faults", *storage]),
        "during_outage": during_outage,
        "killed_pid": first["pid"],
        "trial_dirs": _trial_dirs(sweep_dir),
    }


def _trials_by_kind(record: SweepRecord) -> dict[str, list[optuna.trial.FrozenTrial]]:
    kinds: dict[str, list] = {"clean": [], "nan": [], "raises": []}
    for t in study_trials(record):
        if t.params["train.device"] == BAD_DEVICE:
            kinds["raises"].append(t)
        elif t.params["optim.weight_decay"] == HUGE_DECAY:
            kinds["nan"].append(t)
        else:
            kinds["clean"].append(t)
    return kinds


def _runs_by_number(record: SweepRecord) -> dict[int, object]:
    runs = child_runs(record)
    numbers = Counter(int(r.data.tags["optuna_trial_number"]) for r in runs)
    assert set(numbers.values()) == {1}, f"a trial has several runs: {numbers}"
    return {int(r.data.tags["optuna_trial_number"]): r for r in runs}


def test_failed_trials_are_fail_and_failed_with_the_reason(faulty_sweep):
    record, status = faulty_sweep["record"], faulty_sweep["status"]
    kinds = _trials_by_kind(record)
    assert [len(kinds[k]) for k in ("clean", "nan", "raises")] == [2, 1, 1], kinds
    runs = _runs_by_number(record)
    reasons = {"nan": "NonFiniteLossError: training loss is nan", "raises": "cuda"}
    for kind, reason in reasons.items():
        (trial,) = kinds[kind]
        assert trial.state == State.FAIL
        assert reason.lower() in trial.user_attrs["error"].lower()
        run = runs[trial.number]
        assert run.info.status == "FAILED"
        assert run.data.tags["error"] == trial.user_attrs["error"]
        assert f"trial {trial.number} failed: {trial.user_attrs['error']}" in status.output
    for trial in kinds["clean"]:
        assert trial.state == State.COMPLETE
        assert runs[trial.number].info.status == "FINISHED"
    assert status.exit_code == 0, status.output


def test_killed_worker_resumes_its_trial_from_the_checkpoint(faulty_sweep):
    record = faulty_sweep["record"]
    results = _results(faulty_sweep["trial_dirs"][0])
    # Tune's own result.json is no record of the epochs: on a restart Tune copies the file
    # back from the sweep storage, whose copy may be an epoch behind (a line is lost) or the
    # restart repeats the epoch the kill interrupted. MLflow and Optuna must have each once.
    assert results[-1][M.EPOCH] == EPOCHS
    assert results[0]["pid"] == faulty_sweep["killed_pid"]
    restarted = next(r for r in results if r["pid"] != faulty_sweep["killed_pid"])
    # A restart from scratch would report epoch 1 again; from the checkpoint it goes on.
    assert restarted["iterations_since_restore"] == 1 and restarted[M.EPOCH] >= 2
    error_file = faulty_sweep["trial_dirs"][0] / "error.txt"
    assert "Failure # 1" in error_file.read_text()
    (trial,) = [t for t in study_trials(record) if t.number == 0]
    assert trial.state == State.COMPLETE
    assert sorted(trial.intermediate_values) == list(range(1, EPOCHS + 1))


def test_outage_of_the_tracking_server_loses_and_repeats_nothing(faulty_sweep):
    record = faulty_sweep["record"]
    assert faulty_sweep["during_outage"] >= 2, "trials stalled while MLflow was down"
    client = MlflowClient(record.tracking_uri)
    runs = _runs_by_number(record)
    trials = study_trials(record)
    assert sorted(runs) == [t.number for t in trials]
    for t in trials:
        run_id = runs[t.number].info.run_id
        for name in (M.TRAIN_LOSS, M.MEAN_EXIT_ACC, M.exit_acc(2), M.EPOCH_TIME):
            steps = [m.step for m in client.get_metric_history(run_id, name)]
            assert sorted(steps) == sorted(t.intermediate_values), (t.number, name, steps)
        history = client.get_metric_history(run_id, M.MEAN_EXIT_ACC)
        assert {m.step: m.value for m in history} == pytest.approx(t.intermediate_values)
    parent = client.get_run(record.parent_run_id)
    assert parent.info.status == "FINISHED"
    best = parent.data.tags["best_run_id"]
    artifacts = [a.path for a in client.list_artifacts(best, "checkpoint")]
    assert artifacts == ["checkpoint/anytime.json", "checkpoint/checkpoint.pt"]
    assert not (record.directory / "tracking-journal.jsonl").exists(), "writes left unapplied"


# -- the Optuna study's database stopped and started again mid-sweep -----------------------

DB_EPOCHS = 3
DB_SAMPLES = 5  # two slots, one trial asked ahead: two trials are left after the stop
MIN_OUTAGE_S = 10.0  # and at least two trial epochs (bounded from above before the stop)


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (TCP only, trust authentication) of the
    local installation, stopped and started as an operator would (``pg_ctl stop -m fast``)
    without touching the shared one; run as user ``postgres`` when the tests run as root."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        initdb = found[-1] if found else shutil.which("initdb")
        if initdb is None:
            pytest.skip("no PostgreSQL server installed (initdb)")
        self.bin = Path(initdb).parent
        self.user = "postgres" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="mt-pg-", dir="/tmp"))
        self.data = self.root / "data"
        if self.user:
            shutil.chown(self.root, self.user)
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        settings = f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
        settings += "unix_socket_directories = ''\nfsync = off\n"
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(settings)

    def _pg(self, *command: str) -> None:
        subprocess.run(
            [str(self.bin / command[0]), *command[1:]],
            check=True,
            capture_output=True,
            user=self.user,
            cwd=self.root,
        )

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        """Fast shutdown: open sessions are ended, clients see "terminating connection"."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def _first_epoch_s(url: str, sweep_dir: Path) -> float | None:
    """An upper bound on the first epoch's time: seconds since the start of a trial the study
    has been told an epoch of (None before; the sweep records itself just after it created
    the study)."""
    if not (sweep_dir / "sweep.json").exists():
        return None
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    try:
        trials = optuna.load_study(study_name=sweep_dir.name, storage=storage).trials
        starts = [t.datetime_start for t in trials if t.intermediate_values]
        return (datetime.now() - min(starts)).total_seconds() if starts else None
    finally:
        storage.engine.dispose()


@pytest.fixture(scope="module")
def study_db_restart(tmp_path_factory):
    """A digits sweep whose study is in PostgreSQL, the database stopped once the study has
    an epoch and started again two trial epochs (at least MIN_OUTAGE_S) later."""
    workdir = tmp_path_factory.mktemp("study-db")
    space = short_digits_space(workdir, max_epochs=DB_EPOCHS, num_samples=DB_SAMPLES)
    data = yaml.safe_load(space.read_text())
    data["base"]["train"]["epochs"] = DB_EPOCHS
    space.write_text(yaml.safe_dump(data))
    cluster = PostgresCluster()
    try:
        cluster.start()
        with ray_temp_dir() as ray_dir:
            yield _run_with_db_restart(workdir, space, cluster, ray_dir)
    finally:
        cluster.remove()


def _run_with_db_restart(workdir: Path, space: Path, db: PostgresCluster, ray_dir: str) -> dict:
    command = [str(BIN / "orchestrate"), "launch", "--space", str(space)]
    command += [*sweep_args(workdir, "dbdown"), "--study-storage", db.url]
    launch = _start(command, workdir, ray_dir)
    sweep_dir = workdir / "sweeps" / "dbdown"
    try:
        # Stopped as soon as the study has an epoch, before the last trial is asked: with a
        # trial asked ahead, that waits for two trials to end, an epoch apart at least. The
        # outage is sized before the stop: nothing of the sweep advances while it lasts.
        epoch_s = _wait(lambda: _first_epoch_s(db.url, sweep_dir), launch, "the first epoch")
        db.stop()
        stopped = time.monotonic()
        time.sleep(max(MIN_OUTAGE_S, 2 * epoch_s))
        db.start()
        restarted = datetime.now()
        outage_s = time.monotonic() - stopped
        output, _ = launch.communicate(timeout=TIMEOUT)
    finally:
        if launch.poll() is None:
            launch.kill()
    return {
        "returncode": launch.returncode,
        "output": output,
        "outage_s": outage_s,
        "restarted": restarted,
        "record": SweepRecord.load("dbdown", workdir / "sweeps"),
    }


def test_restart_of_the_study_database_loses_and_repeats_nothing(study_db_restart):
    output, record = study_db_restart["output"], study_db_restart["record"]
    assert study_db_restart["returncode"] == 0, output
    assert "the study's database postgresql://postgres@127.0.0.1" in output
    assert "does not answer" in output and "is back after" in output, output
    assert "Traceback" not in output, output

    trials = study_trials(record)
    assert [t.number for t in trials] == list(range(DB_SAMPLES))  # none lost, none extra
    assert {t.state for t in trials} <= {State.COMPLETE, State.PRUNED}, trials
    assert any(t.datetime_start > study_db_restart["restarted"] for t in trials), (
        "no trial was asked for after the restart"
    )
    for t in trials:
        assert "optim.lr" in t.params and "error" not in t.user_attrs
        last = DB_EPOCHS if t.state == State.COMPLETE else max(t.intermediate_values)
        assert sorted(t.intermediate_values) == list(range(1, last + 1)), t.number

    client = MlflowClient(record.tracking_uri)
    runs = _runs_by_number(record)
    assert sorted(runs) == [t.number for t in trials]
    epoch_times = []
    for t in trials:
        run = runs[t.number]
        assert run.info.status == ("FINISHED" if t.state == State.COMPLETE else "KILLED")
        history = client.get_metric_history(run.info.run_id, M.MEAN_EXIT_ACC)
        assert sorted(m.step for m in history) == sorted(t.intermediate_values), t.number
        assert {m.step: m.value for m in history} == pytest.approx(t.intermediate_values)
        epoch_times += [m.value for m in client.get_metric_history(run.info.run_id, M.EPOCH_TIME)]
    assert study_db_restart["outage_s"] >= 2 * max(epoch_times), "down for under two epochs"
