"""The study's storage waits for a database that does not answer, repeats nothing a lost
answer had committed, and gives up with one line (orchestrator/stores/study_storage.py).

A database restart mid-sweep is `test_faults.py::test_restart_of_the_study_database_...`;
here the faults are cheaper: a port nothing listens on, and an answer lost after a real
commit (the connection "drops" right after a commit, once).
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import time
from collections.abc import Iterator

import optuna
import pytest
import sqlalchemy

from orchestrator.entities.errors import StoreUnavailable
from orchestrator.stores.study_storage import TOKEN_ATTR, PatientRDBStorage, ReadingRDBStorage
from trainer.config import ConfigError

State = optuna.trial.TrialState


@contextlib.contextmanager
def answer_lost_once(storage: PatientRDBStorage) -> Iterator[None]:
    """The next commit reaches the database, but its answer does not come back."""
    lost = []

    def lose(connection: sqlalchemy.Connection) -> None:
        connection.connection.dbapi_connection.commit()
        lost.append(True)
        raise sqlalchemy.exc.OperationalError("COMMIT", None, ConnectionResetError("lost"))

    sqlalchemy.event.listen(storage.engine, "commit", lose, once=True)
    yield
    assert lost, "nothing was committed"


@pytest.fixture
def storage(tmp_path) -> PatientRDBStorage:
    return PatientRDBStorage(f"sqlite:///{tmp_path / 'study.db'}")


def test_an_ask_and_a_tell_whose_answers_were_lost_are_not_repeated(storage, capsys):
    study_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    with answer_lost_once(storage):
        trial_id = storage.create_new_trial(study_id)
    with answer_lost_once(storage):
        assert storage.set_trial_state_values(trial_id, State.COMPLETE, [0.5])
    (trial,) = storage.get_all_trials(study_id)
    assert (trial._trial_id, trial.number, trial.state, trial.values) == (
        trial_id,
        0,
        State.COMPLETE,
        [0.5],
    )
    assert TOKEN_ATTR in trial.system_attrs
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("(lost)" in line for line in lines[::2]), lines
    assert all(line.startswith("the study's database is back after") for line in lines[1::2])


def test_a_study_asks_suggests_reports_and_tells_once_through_lost_answers(storage):
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    with answer_lost_once(storage):
        trial = study.ask()
    with answer_lost_once(storage):
        x = trial.suggest_float("x", 0.0, 1.0)
    with answer_lost_once(storage):
        trial.report(0.25, step=1)
    with answer_lost_once(storage):
        study.tell(trial, 0.75)
    (frozen,) = optuna.load_study(study_name="s", storage=storage.url).trials
    assert (frozen.params, frozen.intermediate_values) == ({"x": x}, {1: 0.25})
    assert (frozen.state, frozen.value) == (State.COMPLETE, 0.75)


def test_a_reading_storage_reads_the_study_and_waits_as_the_sweeps_own(storage, monkeypatch):
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 0.5})
    study.enqueue_trial({"x": 0.25})
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    reading = ReadingRDBStorage(storage.url)
    for copy in (reading, pickle.loads(pickle.dumps(reading))):  # unpickled: a full one
        read = optuna.load_study(study_name="s", storage=copy)
        assert [t.params for t in read.trials] == [t.params for t in study.trials]
        assert read.best_value == study.best_value == 0.25
    assert reading._version_manager is None  # no Alembic: the point of it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"postgresql://127.0.0.1:{s.getsockname()[1]}/study"
    monkeypatch.setenv("MATE_STUDY_DB_WAIT_S", "1")
    down = ReadingRDBStorage(url)  # connects at the first call
    with pytest.raises(StoreUnavailable, match="did not answer for 1 s"):
        down.get_study_id_from_name("s")


def test_a_database_that_stays_down_ends_the_wait_with_one_line(monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://postgres:secret@127.0.0.1:{port}/study"
    monkeypatch.setenv("MATE_STUDY_DB_WAIT_S", "1")
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"did not answer for 1 s \(.*\); giving up$"):
        PatientRDBStorage(url)
    assert time.monotonic() - start < 10
    (waiting,) = capsys.readouterr().out.splitlines()
    assert "does not answer" in waiting and "Connection refused" in waiting
    assert "secret" not in waiting
    # The same outage: another storage on that database (a callback's) fails at once.
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match="giving up"):
        PatientRDBStorage(url)
    assert time.monotonic() - start < 1 and not capsys.readouterr().out


def test_a_refused_call_is_not_repeated(storage):
    with pytest.raises(KeyError):  # no such study: an answer, not an outage
        storage.get_study_id_from_name("missing")


def test_the_wait_must_be_seconds(monkeypatch, tmp_path):
    monkeypatch.setenv("MATE_STUDY_DB_WAIT_S", "ten minutes")
    with pytest.raises(ConfigError, match="MATE_STUDY_DB_WAIT_S is 'ten minutes'"):
        PatientRDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
