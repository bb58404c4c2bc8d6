import math

import pytest
import torch

from trainer import metrics as M
from trainer.config import OptimConfig, parse_job_config
from trainer.engine import (
    NonFiniteLossError,
    build_job,
    fit,
    load_checkpoint,
    lr_factor,
    save_checkpoint,
    train_one_epoch,
)
from trainer.losses import init_teacher_logits


def digits_job(**train):
    return parse_job_config(
        {
            "dataset": {"name": "digits", "val_fraction": 0.2},
            "model": {"arch": "convnet", "exits": [1, 2, 3, 4]},
            "loss": {"kind": "mate", "temperature": 3.0, "kd_weight": 0.5},
            "optim": {"lr": 0.05, "weight_decay": 5e-4},
            "train": {"batch_size": 64, "seed": 0, **train},
        }
    )


def test_fit_mate_on_digits_learns_at_every_exit():
    job = build_job(digits_job(epochs=20))
    final = fit(job)
    assert final[M.exit_acc(4)] >= 0.90
    for k in range(1, 5):
        assert final[M.exit_acc(k)] >= 0.5, f"exit {k} barely beats chance (0.1)"
    assert set(M.epoch_metric_names(4)) <= set(final)
    assert final[M.EPOCH] == 20
    assert 0.0 < final[M.ANYTIME_AUC] < 1.0
    assert final[M.ANYTIME_GFLOPS] <= job.gflops[-1] + 1e-12
    # The teacher weights are trained: they moved away from their initial values.
    assert not torch.allclose(job.teacher_logits, init_teacher_logits(4, "deeper"))


def test_fit_reports_each_epoch_in_order():
    seen = []
    fit(build_job(digits_job(epochs=3)), on_epoch=lambda m: seen.append(m[M.EPOCH]))
    assert seen == [1, 2, 3]


class _Stop(Exception):
    pass


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    cfg = digits_job(epochs=8)
    uninterrupted = fit(build_job(cfg))

    first = build_job(cfg)

    def stop_after_five(metrics):
        if metrics[M.EPOCH] == 5:
            save_checkpoint(first, tmp_path)
            raise _Stop

    with pytest.raises(_Stop):
        fit(first, on_epoch=stop_after_five)
    torch.manual_seed(1234)  # a different global RNG state must not matter after loading
    resumed_job = build_job(cfg)
    load_checkpoint(resumed_job, tmp_path)
    assert resumed_job.epoch == 5
    resumed = fit(resumed_job)
    for name, value in uninterrupted.items():
        if name != M.EPOCH_TIME:
            assert resumed[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name


def test_non_finite_loss_stops_with_clear_error():
    job = build_job(digits_job(epochs=2))
    with torch.no_grad():
        next(job.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="training loss is nan in epoch 1; lower optim.lr"):
        train_one_epoch(job)


def test_bf16_precision_runs_on_cpu():
    job = build_job(digits_job(epochs=1, precision="bf16"))
    assert job.autocast_dtype == torch.bfloat16
    final = fit(job)
    assert math.isfinite(final[M.TRAIN_LOSS])


@pytest.mark.parametrize("kind", ["dsn", "byot", "eed", "phuong_lampert"])
def test_fit_runs_every_baseline(kind):
    cfg = parse_job_config({**digits_job(epochs=2).to_dict(), "loss": {"kind": kind}})
    final = fit(build_job(cfg))
    assert final[M.exit_acc(4)] > 0.2


def test_lr_factor_follows_schedule():
    cosine = OptimConfig(schedule="cosine")
    assert lr_factor(cosine, 10, 0) == 1.0
    assert lr_factor(cosine, 10, 5) == pytest.approx(0.5)
    multistep = OptimConfig(schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(multistep, 8, e) for e in (0, 3, 4, 6)] == pytest.approx([1, 1, 0.1, 0.01])
    warm = OptimConfig(schedule="constant", warmup_epochs=3)
    assert [lr_factor(warm, 10, e) for e in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1, 1])
