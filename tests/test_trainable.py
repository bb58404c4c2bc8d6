import subprocess
import sys

import pytest
from ray import tune

from orchestrator.entities.space import parse_space
from orchestrator.tuning.tuner import trial_param_space
from trainer import metrics as M
from trainer.config import ConfigError, parse_job_config
from trainer.trainable import job_config_from_trial, train_job

TINY_JOB = parse_job_config(
    {
        "dataset": {"name": "digits", "val_fraction": 0.2},
        "model": {"arch": "convnet", "exits": [2, 4]},
        "optim": {"lr": 0.05},
        "train": {"epochs": 2, "batch_size": 128},
    }
).to_dict()


def test_job_config_from_trial_applies_overrides():
    cfg = job_config_from_trial({"job": TINY_JOB, "overrides": {"loss.temperature": 5.0}})
    assert cfg.loss.temperature == 5.0
    assert cfg.model.exits == [2, 4]


@pytest.mark.parametrize("kind", ["byot", "phuong_lampert"])  # (eed shares MATE's lambda, T)
def test_a_trial_that_switches_the_loss_kind_gets_that_kinds_defaults(kind):
    """The sweep's base job is MATE (its defaults: kd_weight 1, T 3); a trial the searcher
    switches to another kind trains with that kind's reference defaults, not MATE's."""
    base = {
        "dataset": {"name": "digits"},
        "model": {"arch": "convnet", "exits": [2, 4]},
        "loss": {"kind": "mate"},
    }
    space = {
        "base": base,
        "search": {"metric": M.MEAN_EXIT_ACC, "mode": "max", "num_samples": 2},
        "space": {"loss.kind": {"type": "categorical", "choices": ["mate", kind]}},
    }
    config = {**trial_param_space(parse_space(space, "test")), "overrides": {"loss.kind": kind}}
    alone = parse_job_config({**base, "loss": {"kind": kind}})
    mates = parse_job_config(base).loss
    assert job_config_from_trial(config).loss == alone.loss
    assert (alone.loss.kd_weight, alone.loss.temperature) != (mates.kd_weight, mates.temperature)


def test_job_config_from_trial_rejects_unknown_override():
    with pytest.raises(ConfigError, match="trial config: unknown key `loss.temp`"):
        job_config_from_trial({"job": TINY_JOB, "overrides": {"loss.temp": 5.0}})


def test_train_job_under_tuner_reports_every_metric(local_ray, tmp_path):
    tuner = tune.Tuner(
        tune.with_resources(train_job, {"cpu": 1}),
        param_space={
            "job": TINY_JOB,
            "overrides": {"loss.temperature": tune.grid_search([2.0, 4.0])},
        },
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="trainable", verbose=0),
    )
    results = tuner.fit()
    assert len(results) == 2
    assert not results.errors
    expected = set(M.epoch_metric_names(2)) | {M.exit_gflops(1), M.exit_gflops(2)}
    for result in results:
        assert expected <= set(result.metrics)
        assert result.metrics["training_iteration"] == 2
        assert result.metrics[M.EPOCH] == 2
        assert result.checkpoint is not None
        history = result.metrics_dataframe
        assert list(history[M.EPOCH]) == [1, 2]
        assert 0.0 <= result.metrics[M.exit_acc(2)] <= 1.0
        assert result.metrics[M.exit_gflops(1)] < result.metrics[M.exit_gflops(2)]


def test_importing_the_trainable_leaves_torchvision_out():
    """Every trial actor and Tune's driver import the trainable: torchvision would cost each
    about two seconds of CPU (it is imported to decode images or build a ResNet)."""
    probe = "import sys, trainer.trainable; print('torchvision' in sys.modules)"
    assert subprocess.check_output([sys.executable, "-c", probe], text=True).strip() == "False"
