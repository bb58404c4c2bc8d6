"""Optuna decides for Ray: pruned trials reach the study as PRUNED, never as COMPLETE.

Ray's stock OptunaSearch + ASHAScheduler tell Optuna an early-stopped trial is COMPLETE with
its partial-budget value; the test runs both side by side on the same toy objective (real
Ray Tune, real Optuna storage) and reads the studies back.
"""

from __future__ import annotations

import copy
import pickle

import optuna
import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from orchestrator.entities.names import ERROR
from orchestrator.entities.space import load_space
from orchestrator.stores.study import open_study
from orchestrator.tuning.scheduler import OptunaPruningScheduler, failure_reason
from orchestrator.tuning.searcher import OptunaSearcher
from sweep_helpers import short_digits_space
from toy_curve import EPOCHS, METRIC, full_budget_value, toy_trainable
from trainer import metrics as M
from trainer.trainable import TRIAL_ERROR

State = optuna.trial.TrialState


def _fit(tmp_path, name: str, **tune_config) -> None:
    tuner = tune.Tuner(
        tune.with_resources(toy_trainable, {"cpu": 1}),  # two actors, reused
        tune_config=tune.TuneConfig(num_samples=8, reuse_actors=True, **tune_config),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name=name, verbose=0),
    )
    tuner.fit()


@pytest.fixture
def spec(tmp_path):
    return load_space(short_digits_space(tmp_path, max_epochs=EPOCHS, num_samples=8))


def test_stock_optuna_search_records_stopped_trials_as_complete_but_ours_prunes(
    local_ray, tmp_path, spec
):
    stock_storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'stock.db'}")
    stock = OptunaSearch(
        space={"optim.lr": optuna.distributions.FloatDistribution(0.01, 0.2, log=True)},
        metric=METRIC,
        mode="max",
        study_name="stock",
        storage=stock_storage,
        seed=0,
    )
    asha = ASHAScheduler(
        time_attr=M.EPOCH, metric=METRIC, mode="max", max_t=EPOCHS, reduction_factor=2
    )
    _fit(tmp_path, "stock", search_alg=stock, scheduler=asha)

    ours_url = f"sqlite:///{tmp_path / 'ours.db'}"
    searcher = OptunaSearcher(spec, ours_url, "ours")
    _fit(tmp_path, "ours", search_alg=searcher, scheduler=OptunaPruningScheduler(searcher))

    stock_trials = optuna.load_study(study_name="stock", storage=stock_storage).trials
    # The curve is deterministic: a value below the full-budget one is a partial-budget value.
    assert all(t.state == State.COMPLETE for t in stock_trials)
    partial = [t for t in stock_trials if t.value < full_budget_value(t.params["optim.lr"])]
    assert partial, "stock ASHA stopped nothing early"

    ours = optuna.load_study(study_name="ours", storage=ours_url).trials
    assert len(ours) == 8
    assert {t.state for t in ours} == {State.COMPLETE, State.PRUNED}
    for t in ours:
        if t.state == State.COMPLETE:
            assert t.last_step == EPOCHS and t.value >= full_budget_value(t.params["optim.lr"])
        else:
            assert t.last_step < EPOCHS


def test_searcher_tells_fail_for_errored_trial_and_complete_for_full_budget(tmp_path, spec):
    searcher = OptunaSearcher(spec, f"sqlite:///{tmp_path / 's.db'}", "unit")
    first, second = searcher.suggest("a"), searcher.suggest("b")
    overrides = first["overrides"]
    assert set(overrides) == {key for key, p in spec.space.items() if p.applies(overrides)}
    for epoch in range(1, EPOCHS + 1):
        assert not searcher.report("a", {M.EPOCH: epoch, METRIC: 0.5 + epoch / 10})
    searcher.on_trial_complete("a", {M.EPOCH: EPOCHS, METRIC: 0.9})
    searcher.on_trial_complete("b", error=True)
    trials = searcher.study.trials
    assert [t.state for t in trials] == [State.COMPLETE, State.FAIL]
    assert trials[0].value == 0.9
    assert trials[0].intermediate_values == {e: 0.5 + e / 10 for e in range(1, EPOCHS + 1)}
    assert first["optuna_trial_number"] == 0 and second["optuna_trial_number"] == 1


def test_searcher_prunes_a_trial_below_the_rung(tmp_path, spec):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = open_study(spec, url, "rung")
    for value in (0.8, 0.9):  # two finished trials set the bar at the first rung
        trial = study.ask()
        trial.report(value, step=1)
        assert not trial.should_prune()  # records the trial's value at the first rung
        study.tell(trial, value)
    searcher = OptunaSearcher(spec, url, "rung")
    searcher.suggest("weak")
    assert searcher.report("weak", {M.EPOCH: 1, METRIC: 0.1})
    searcher.on_trial_complete("weak", {M.EPOCH: 1, METRIC: 0.1})
    assert searcher.study.trials[-1].state == State.PRUNED
    assert searcher.pruned == {"weak"}


def test_searcher_survives_pickling(tmp_path, spec):
    searcher = OptunaSearcher(spec, f"sqlite:///{tmp_path / 's.db'}", "pickled")
    searcher.suggest("a")
    copy = pickle.loads(pickle.dumps(searcher))
    copy.on_trial_complete("a", {M.EPOCH: EPOCHS, METRIC: 0.7})
    assert copy.study.trials[0].state == State.COMPLETE


def _restored(searcher: OptunaSearcher, spec, url: str, name: str) -> OptunaSearcher:
    """A searcher as Tune restores it after a driver crash: from an older saved state."""
    restored = OptunaSearcher(spec, url, name, num_samples=searcher.num_samples)
    restored.set_state(copy.deepcopy(searcher.get_state()))
    return restored


def test_restored_searcher_adopts_a_trial_the_crashed_driver_started(tmp_path, spec):
    url = f"sqlite:///{tmp_path / 's.db'}"
    searcher = OptunaSearcher(spec, url, "crash")
    searcher.suggest("a")
    searcher.report("a", {M.EPOCH: 1, METRIC: 0.5})
    saved = _restored(searcher, spec, url, "crash")  # Tune's last experiment checkpoint
    lost = searcher.suggest("b")  # started after it: Tune's restored state has no "b"
    searcher.report("b", {M.EPOCH: 1, METRIC: 0.6})
    searcher.report("a", {M.EPOCH: 2, METRIC: 0.55})

    adopted = saved.suggest("c")  # Tune asks again for the trial it lost
    assert adopted == lost  # same Optuna trial number, same params
    assert len(saved.study.trials) == 2
    # Both restart from older checkpoints: steps the study has are not reported again.
    assert not saved.report("c", {M.EPOCH: 1, METRIC: 0.1})
    assert not saved.report("a", {M.EPOCH: 2, METRIC: 0.1})
    assert not saved.report("a", {M.EPOCH: 3, METRIC: 0.58})
    values = {t.number: t.intermediate_values for t in saved.study.trials}
    assert values == {0: {1: 0.5, 2: 0.55, 3: 0.58}, 1: {1: 0.6}}
    assert saved.study.trials[1].user_attrs["ray_trial_id"] == "c"


def test_restored_searcher_stops_a_trial_the_study_finished(tmp_path, spec):
    url = f"sqlite:///{tmp_path / 's.db'}"
    searcher = OptunaSearcher(spec, url, "done")
    searcher.suggest("a")
    saved = _restored(searcher, spec, url, "done")
    for epoch in range(1, EPOCHS + 1):
        searcher.report("a", {M.EPOCH: epoch, METRIC: 0.5})
    searcher.on_trial_complete("a", {M.EPOCH: EPOCHS, METRIC: 0.5})
    assert saved.report("a", {M.EPOCH: 1, METRIC: 0.5})  # stop: nothing left to learn
    saved.on_trial_complete("a", {M.EPOCH: 1, METRIC: 0.5})
    assert saved.study.trials[0].state == State.COMPLETE
    assert saved.study.trials[0].value == 0.5


def test_restored_searcher_counts_a_lost_trial_that_finished_against_the_budget(tmp_path, spec):
    url = f"sqlite:///{tmp_path / 's.db'}"
    searcher = OptunaSearcher(spec, url, "budget", num_samples=2)
    searcher.suggest("a")
    saved = _restored(searcher, spec, url, "budget")
    searcher.suggest("b")  # started after Tune's last checkpoint, and pruned before the crash
    searcher.pruned.add("b")
    searcher.on_trial_complete("b", {M.EPOCH: 1, METRIC: 0.1})
    # Restored, Tune knows one trial of two and asks for another: the budget is spent.
    assert saved.suggest("c") == Searcher.FINISHED
    assert [t.state for t in saved.study.trials] == [State.RUNNING, State.PRUNED]


def test_failed_trial_keeps_why_in_the_study(tmp_path, spec):
    searcher = OptunaSearcher(spec, f"sqlite:///{tmp_path / 's.db'}", "why")
    searcher.suggest("nan")
    searcher.suggest("crash")
    searcher.on_trial_complete("nan", {TRIAL_ERROR: "NonFiniteLossError: loss is nan"})
    searcher.errors["crash"] = "RuntimeError: boom"  # what the scheduler read from Tune
    searcher.on_trial_complete("crash", error=True)
    trials = searcher.study.trials
    assert [t.state for t in trials] == [State.FAIL, State.FAIL]
    assert [t.user_attrs[ERROR] for t in trials] == [
        "NonFiniteLossError: loss is nan",
        "RuntimeError: boom",
    ]


def test_failure_reason_is_the_exception_line_of_the_last_failure(tmp_path):
    error_file = tmp_path / "error.txt"
    error_file.write_text(
        "Failure # 1 (occurred at 2026-01-01)\nThe actor died unexpectedly.\n\tpid: 12\n"
        "Failure # 2 (occurred at 2026-01-01)\nray::ImplicitFunc.train() (pid=3)\n"
        '  File "x.py", line 1, in f\nRuntimeError: boom\n'
    )

    class Trial:
        pass

    trial = Trial()
    trial.error_file = str(error_file)
    assert failure_reason(trial) == "RuntimeError: boom"
    error_file.write_text("Failure # 1 (occurred at 2026-01-01)\nThe actor died unexpectedly.\n")
    assert failure_reason(trial) == "The actor died unexpectedly."
