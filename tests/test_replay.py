"""The search benchmark's replay (bench/replay.py): through real Ray Tune and Optuna, a
replayed trial reports exactly the recorded curve of its configuration, and the recorded
CIFAR-10 table covers its grid."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import optuna
from ray import cloudpickle, tune

from orchestrator.entities.space import decode_params, grid_size
from orchestrator.tuning.scheduler import OptunaPruningScheduler
from orchestrator.tuning.searcher import OptunaSearcher
from orchestrator.tuning.tuner import trial_param_space
from trainer import metrics as M

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import replay  # bench/ is not a package

GRID = {"optim.lr": [0.05, 0.1], "loss.temperature": [1.0, 4.0]}


def _table() -> replay.Curves:
    """A small grid on digits with distinct, irregular values per configuration and epoch."""
    space = {
        "base": {"dataset": {"name": "digits"}, "train": {"epochs": 3}},
        "search": {"num_samples": 4, "sampler": {"kind": "grid"}, "pruner": {"kind": "none"}},
        "space": {key: {"type": "categorical", "choices": c} for key, c in GRID.items()},
    }
    combos = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    curves = {
        replay.config_key(c): [round(0.1 * i + 0.013 * e**2, 6) for e in range(1, 4)]
        for i, c in enumerate(combos)
    }
    return replay.Curves(M.MEAN_EXIT_ACC, space, curves)


def test_replayed_trials_report_exactly_the_recorded_curves(local_ray, tmp_path):
    curves = _table()
    spec = curves.spec()
    searcher = OptunaSearcher(spec, f"sqlite:///{tmp_path / 'study.db'}", "replay", num_samples=4)
    cloudpickle.register_pickle_by_value(replay)  # Ray's workers cannot import bench/
    tune.Tuner(
        tune.with_parameters(replay.replay_trial, curves=curves),
        param_space=trial_param_space(spec),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=OptunaPruningScheduler(searcher),
            num_samples=4,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="replay", verbose=0),
    ).fit()
    study = optuna.load_study(study_name="replay", storage=searcher.storage_url)
    told = {
        replay.config_key(decode_params(spec, t.params)): [
            t.intermediate_values[e] for e in sorted(t.intermediate_values)
        ]
        for t in study.trials
    }
    assert told == curves.curves  # every configuration once, every value exactly
    assert [t.value for t in study.trials] == [told[k][-1] for k in told]


def test_recorded_cifar10_table_covers_its_grid():
    curves = replay.Curves.load()
    spec = curves.spec()
    assert grid_size(spec) == len(curves.curves)
    lengths = {len(curve) for curve in curves.curves.values()}
    assert lengths == {spec.max_epochs}
    for key in curves.curves:
        assert spec.job_for(json.loads(key))  # a valid job of the recorded space
    assert all(0.0 < v < 1.0 for curve in curves.curves.values() for v in curve)
