"""The searcher's study storage reads the database once and writes behind
(orchestrator/stores/study_cache.py), and TPE's group decomposition of a conditional space is
added to trial by trial (orchestrator/stores/study.py): a sweep asks exactly what it asked
with Optuna's own storage cache and search space, what the cache holds is what the database
holds once flushed, and Tune's loop does not wait for the database."""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.search_space.group_decomposed import _GroupDecomposedSearchSpace

from orchestrator.entities.space import load_space
from orchestrator.stores.study import load_study_from, open_study, suggest_params
from orchestrator.stores.study_cache import SoleWriterCache
from orchestrator.stores.study_storage import PatientRDBStorage

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "mate_cifar10.yaml"
State = optuna.trial.TrialState


def run_sweep(study: optuna.Study, spec, trials: int) -> None:
    """Up to 4 trials running at once (the constant liar sees them), each reporting an
    epoch when it starts and one when it ends; every fifth pruned, every seventh failed,
    the others complete."""
    running: list[tuple[optuna.Trial, float]] = []
    for n in range(trials):
        trial = study.ask()
        params = suggest_params(spec, trial)
        trial.set_user_attr("ray_trial_id", f"t{n}")
        value = -((math.log(params["optim.lr"]) + 2.5) ** 2) - 0.1 * params["loss.temperature"]
        trial.report(value / 2, step=1)
        running.append((trial, value))
        if len(running) < 4:
            continue
        done, value = running.pop(0)
        done.report(value, step=2)
        if done.number % 5 == 0:
            study.tell(done, state=State.PRUNED)
        elif done.number % 7 == 0:
            study.tell(done, state=State.FAIL)
        else:
            study.tell(done, value)


def comparable(trials: list[optuna.trial.FrozenTrial]) -> list[tuple]:
    """What the cache and the database agree on (the cache's end times are the driver's
    clock, the database's its own, a moment later)."""
    return [
        (
            *(t.number, t.state, t.values, t.params, t.distributions, t.intermediate_values),
            *(t.user_attrs, t.datetime_start, t.datetime_complete is None),
        )
        for t in trials
    ]


def test_a_sweep_asks_what_it_asked_with_optunas_own_cache_and_search_space(tmp_path):
    spec = load_space(SPACE)
    ours = open_study(spec, f"sqlite:///{tmp_path / 'ours.db'}", "s")
    assert isinstance(ours._storage, SoleWriterCache)
    stock = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'stock.db'}",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(
            seed=0, n_startup_trials=6, multivariate=True, group=True, constant_liar=True
        ),
    )
    run_sweep(ours, spec, 40)
    run_sweep(stock, spec, 40)
    assert [t.params for t in ours.trials] == [t.params for t in stock.trials]
    # The conditional parameter made TPE decompose the space into more than one group.
    groups = ours.sampler._group_decomposed_search_space.calculate(ours).search_spaces
    assert len(groups) > 1
    assert groups == _GroupDecomposedSearchSpace(True).calculate(ours).search_spaces


def test_the_cache_holds_what_the_database_holds_and_reads_it_once(tmp_path):
    spec = load_space(SPACE)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(spec, url, "s")
    reads: list[str] = []
    engine = study._storage._backend.engine
    sqlalchemy.event.listen(
        engine,
        "before_cursor_execute",
        lambda conn, cursor, sql, *args: reads.append(sql) if sql.startswith("SELECT") else None,
    )
    run_sweep(study, spec, 20)
    study._storage.flush()
    stored = load_study_from(url, "s").trials
    assert comparable(study.trials) == comparable(stored)
    for cached, written in zip(study.trials, stored, strict=True):
        if cached.datetime_complete is not None:
            assert 0 <= (written.datetime_complete - cached.datetime_complete).total_seconds() < 5
    reads.clear()
    study.get_trials()
    study._storage.get_trial(study.trials[-1]._trial_id)  # a running one
    assert reads == []  # after the first read, the study is read from memory


def test_a_restarted_driver_reads_the_study_again(tmp_path):
    """The study a new process opens is the database's, with what the last one wrote."""
    spec = load_space(SPACE)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = open_study(spec, url, "s")
    run_sweep(first, spec, 10)
    first._storage.flush()
    second = SoleWriterCache(PatientRDBStorage(url))
    study_id = second.get_study_id_from_name("s")
    assert comparable(second.get_all_trials(study_id)) == comparable(first.trials)


def test_the_loop_does_not_wait_for_the_database_and_a_flush_does(tmp_path):
    """With the database locked by another connection, an epoch's value and a trial's end
    return at once and show in the study; a flush waits for the lock and writes them."""
    spec = load_space(SPACE)
    path = tmp_path / "study.db"
    study = open_study(spec, f"sqlite:///{path}", "s")
    trial = study.ask()
    suggest_params(spec, trial)
    study.get_trials()  # the first read
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    start = time.perf_counter()
    trial.report(0.5, step=1)
    study.tell(trial, 0.75)
    assert time.perf_counter() - start < 0.5
    (cached,) = study.trials
    assert (cached.state, cached.value, cached.intermediate_values) == (
        State.COMPLETE,
        0.75,
        {1: 0.5},
    )
    lock.execute("COMMIT")
    lock.close()
    study._storage.flush()
    (stored,) = load_study_from(f"sqlite:///{path}", "s").trials
    assert (stored.state, stored.value, stored.intermediate_values) == (
        State.COMPLETE,
        0.75,
        {1: 0.5},
    )


def test_a_write_the_database_refuses_is_raised_by_the_next_flush(tmp_path):
    spec = load_space(SPACE)
    study = open_study(spec, f"sqlite:///{tmp_path / 'study.db'}", "s")
    trial = study.ask()
    study.get_trials()  # the first read
    study._storage.set_trial_user_attr(trial._trial_id, "unstorable", object())
    with pytest.raises(TypeError):
        study._storage.flush()
