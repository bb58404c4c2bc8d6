"""The sampler's process: a mirror of the study that asks exactly what the study would.

A reference study in this process asks and is told; the mirror, in a real child process, is
driven the way the searcher drives it (ask, write the trial to the real study, bind, tell
the end). Seeded TPE then proposes the same parameters in both, trial for trial, which it
would not if an end (or a pruned trial's intermediate values) were lost on the way.
"""

from __future__ import annotations

import copy
import math

import optuna
import pytest
import yaml

from orchestrator.entities.names import ERROR
from orchestrator.entities.space import decode_params, load_space, parse_space
from orchestrator.stores.study import make_sampler, suggest_params
from orchestrator.tuning.sampler_process import MAX_INVALID_ASKS, SamplerProcess
from sweep_helpers import DIGITS_SPACE
from trainer.config import ConfigError

State = optuna.trial.TrialState
TRIALS = 14  # the digits space starts TPE after 4: ten trials are TPE's


@pytest.fixture(scope="module")
def spec():
    return load_space(DIGITS_SPACE)


def _outcome(number: int, params: dict) -> tuple[State, list[float] | None, dict[int, float]]:
    """How trial `number` ends: every third is pruned after two epochs, every fifth fails."""
    value = math.sin(7 * float(params["optim.lr"])) + float(params["loss.temperature"]) / 8
    if number % 5 == 4:
        return State.FAIL, None, {}
    if number % 3 == 2:
        return State.PRUNED, None, {1: value / 2, 2: value * 0.8}
    return State.COMPLETE, [value], {1: value / 2, 2: value * 0.8}


def _reference(spec, trials: int) -> tuple[list[dict], optuna.Study]:
    """The parameters of `trials` asks of a study in this process, told as they end."""
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
    asked = []
    for number in range(trials):
        trial = study.ask()
        params = suggest_params(spec, trial)
        asked.append(params)
        state, values, intermediate = _outcome(number, params)
        for step, value in intermediate.items():
            trial.report(value, step)
        study.tell(trial, values, state=state)
    return asked, study


def _drive(sampler: SamplerProcess, study: optuna.Study, trials: int) -> list[dict]:
    """Ask the mirror `trials` times as the searcher does, ending each trial in `study`."""
    asked = []
    for _ in range(trials):
        reply = sampler.ask()
        trial_id = study._storage.create_new_trial(study._study_id, template_trial=reply.trial)
        sampler.bind(reply.mirror_id, trial_id)
        trial = optuna.Trial(study, trial_id)
        asked.append(trial.params)
        state, values, intermediate = _outcome(trial.number, trial.params)
        for step, value in intermediate.items():
            trial.report(value, step)
        study.tell(trial, values, state=state)
        sampler.finish(study._storage.get_trial(trial_id))
    return asked


def test_the_mirror_asks_what_the_study_would_trial_for_trial(spec):
    expected, _ = _reference(spec, TRIALS)
    study = optuna.create_study(direction="maximize")
    sampler = SamplerProcess(spec, [])
    try:
        assert _drive(sampler, study, TRIALS) == expected
    finally:
        sampler.close()
    assert not sampler._process.is_alive()
    assert {t.state for t in study.trials} == {State.COMPLETE, State.PRUNED, State.FAIL}


def test_a_new_mirror_starts_from_the_trials_of_the_study(spec):
    """A restarted driver's mirror is loaded with the study so far, running trials too."""
    _, done = _reference(spec, TRIALS)
    running = copy.deepcopy(done.trials[-1])
    running.state, running.values, running.datetime_complete = State.RUNNING, None, None
    history = [*done.trials, running]
    reference = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
    for trial in history:
        reference.add_trial(trial)
    expected = suggest_params(spec, reference.ask())

    study = optuna.create_study(direction="maximize")
    for trial in history:
        study.add_trial(trial)
    sampler = SamplerProcess(spec, study.trials)
    try:
        assert _drive(sampler, study, 1) == [expected]
    finally:
        sampler.close()


REFUSING = {
    "base": {
        "dataset": {"name": "digits"},
        "model": {"arch": "convnet"},
        "loss": {"kind": "dsn"},
    },
    "search": {"metric": "val/mean_exit_acc", "mode": "max", "sampler": {"kind": "random"}},
    "space": {
        "loss.kind": {"type": "categorical", "choices": ["byot", "phuong_lampert"]},
        "loss.kd_weight": {"type": "float", "low": 0.5, "high": 1.5},
    },
}


def test_refused_configurations_come_back_as_failed_trials_with_why():
    """BYOT's and Phuong-Lampert's kd_weight must be <= 1: the mirror tells itself FAIL
    and asks again."""
    spec = parse_space(REFUSING, "refusing.yaml")
    sampler = SamplerProcess(spec, [])
    try:
        replies = [sampler.ask() for _ in range(8)]
    finally:
        sampler.close()
    for reply in replies:
        assert decode_params(spec, reply.trial.params)["loss.kd_weight"] <= 1.0
        assert reply.trial.state == State.RUNNING
        spec.job_for(decode_params(spec, reply.trial.params))
    refused = [trial for reply in replies for trial in reply.refused]
    assert refused, "half the range is refused: eight asks meet some"
    for trial in refused:
        assert trial.state == State.FAIL and trial.params["loss.kd_weight"] > 1.0
        assert trial.user_attrs[ERROR].startswith("never ran: ")
        assert "must be <= 1 for " in trial.user_attrs[ERROR]


def test_a_space_with_no_valid_configuration_is_a_config_error():
    data = yaml.safe_load(yaml.safe_dump(REFUSING))
    data["space"]["loss.kd_weight"] = {"type": "float", "low": 1.2, "high": 2.0}
    sampler = SamplerProcess(parse_space(data, "never.yaml"), [])
    try:
        with pytest.raises(ConfigError, match=f"no valid configuration in {MAX_INVALID_ASKS} asks"):
            sampler.ask()
    finally:
        sampler.close()


def test_a_sampler_process_that_died_is_an_error_on_the_driver(spec):
    sampler = SamplerProcess(spec, [])
    sampler._process.kill()
    sampler._process.join()
    with pytest.raises(RuntimeError, match="the Optuna sampler process ended"):
        sampler.ask()
    sampler.close()
