"""`promote --pick`: rules parsed against the sweep's objectives, trials chosen from a study."""

from __future__ import annotations

import optuna
import pytest

from orchestrator.entities.space import SearchSettings
from orchestrator.rendering.tables import best_summary
from orchestrator.selection.pick import parse_pick, pick_trial
from orchestrator.selection.trials import pareto_trials
from trainer.config import ConfigError

ACC, GFLOPS = "val/mean_exit_acc", "val/anytime_gflops"
TWO = SearchSettings(metric=[ACC, GFLOPS], mode=["max", "min"])
ONE = SearchSettings(metric=ACC, mode="max")

# (accuracy, GFLOPs) of trials 0..5; trial 4 is pruned, trial 5 still running.
TRIALS = [(0.90, 0.0030), (0.95, 0.0050), (0.85, 0.0010), (0.80, 0.0020), (0.99, 0.0001)]


def _study(search: SearchSettings) -> optuna.Study:
    directions = ["maximize" if m == "max" else "minimize" for m in search.modes]
    study = optuna.create_study(directions=directions, study_name="s")
    for i, values in enumerate(TRIALS):
        state = optuna.trial.TrialState.PRUNED if i == 4 else optuna.trial.TrialState.COMPLETE
        values = list(values[: len(directions)]) if state.name == "COMPLETE" else None
        study.add_trial(optuna.trial.create_trial(state=state, values=values))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING))
    return study


def test_pareto_set_and_summary():
    # Trial 3 (0.80, 0.0020) is beaten by trial 2 (0.85, 0.0010) on both; trial 4 is pruned.
    study = _study(TWO)
    assert [t.number for t in pareto_trials(study)] == [1, 0, 2]
    assert best_summary(study) == "Pareto set of 3 trials: 1, 0, 2"


def test_default_pick_is_best_on_the_first_objective():
    assert pick_trial(_study(TWO), TWO, parse_pick("best", TWO)).number == 1
    assert pick_trial(_study(ONE), ONE, parse_pick("best", ONE)).number == 1


@pytest.mark.parametrize(
    ("rule", "number", "words"),
    [
        (f"{GFLOPS}<=0.0035", 0, f"best {ACC} with {GFLOPS} <= 0.0035"),
        (f"{GFLOPS} <= 0.0015", 2, f"best {ACC} with {GFLOPS} <= 0.0015"),
        (f"{ACC}>=0.88", 0, f"best {GFLOPS} with {ACC} >= 0.88"),
        ("trial=3", 3, "trial 3, named"),
        ("trial:2", 2, "trial 2, named"),
    ],
)
def test_pick_rules(rule, number, words):
    parsed = parse_pick(rule, TWO)
    assert pick_trial(_study(TWO), TWO, parsed).number == number
    assert parsed.describe(TWO) == words


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("fastest", "--pick is 'fastest', but must be best, trial=N, or METRIC<=X"),
        ("val/exit1/acc>=0.5", "val/exit1/acc is not an objective of this sweep"),
        (f"{GFLOPS}<=cheap", "'cheap' is not a number"),
        (f"{GFLOPS}<=nan", "'nan' is not a number"),
    ],
)
def test_bad_pick_rules(rule, message):
    with pytest.raises(ConfigError, match="^" + "--pick is") as err:
        parse_pick(rule, TWO)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("trial=4", "trial 4 did not finish; finished: 0, 1, 2, 3"),
        (f"{GFLOPS}<=0.0005", f"no finished trial meets it ({GFLOPS} of the finished trials: "),
    ],
)
def test_pick_without_a_match(rule, message):
    with pytest.raises(ConfigError) as err:
        pick_trial(_study(TWO), TWO, parse_pick(rule, TWO))
    assert message in str(err.value)


def test_pick_from_a_sweep_with_no_finished_trial():
    study = optuna.create_study(study_name="empty")
    with pytest.raises(ConfigError, match="sweep 'empty' has no finished trial to promote yet"):
        pick_trial(study, ONE, parse_pick("best", ONE))
