import math
import warnings

import pytest
import torch

from trainer import metrics as M
from trainer import precision
from trainer.config import OptimConfig, apply_overrides, parse_job_config
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
from trainer.precision import EMULATED_BF16_WARNING


def digits_job(loss=None, optim=None, **train):
    return parse_job_config(
        {
            "dataset": {"name": "digits", "val_fraction": 0.2},
            "model": {"arch": "convnet", "exits": [1, 2, 3, 4]},
            "loss": {"kind": "mate", "temperature": 3.0, "kd_weight": 0.5, **(loss or {})},
            "optim": {"lr": 0.05, "weight_decay": 5e-4, **(optim or {})},
            "train": {"batch_size": 64, "seed": 0, **train},
        }
    )


# MATE's earlier reconstruction: static teacher vectors trained only through sum_j CE(t_j).
STATIC_ONE_LIKE = {
    "teacher_weights": "static",
    "teacher_ce": "exits",
    "detach_targets": True,
    "exit_ce_weight": "one_minus_kd",
    "kd_rampup": 0.0,
}


def _learns_and_reports_teachers(final: dict[str, float], teacher_acc: float) -> torch.Tensor:
    """Every exit and teacher of a 4-exit digits MATE job learnt, every MATE metric is there;
    the teachers' [J, K] weights over the exits (rows sum to 1)."""
    assert final[M.exit_acc(4)] >= 0.90
    for k in range(1, 5):
        assert final[M.exit_acc(k)] >= 0.5, f"exit {k} barely beats chance (0.1)"
        assert final[M.teacher_acc(k)] >= teacher_acc
    assert set(M.epoch_metric_names(4, "mate")) <= set(final)
    weights = torch.tensor(
        [[final[M.teacher_weight(j, k)] for k in range(1, 5)] for j in range(1, 5)]
    )
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4))
    return weights


@pytest.mark.parametrize("support", ["all", "deeper"])
def test_fit_mate_static_on_digits_learns_and_reports_its_teachers(support):
    # Teachers start identical (uniform init) and train only through sum_j CE(t_j): with
    # support "all" every a_j gets the same gradient, so they stay one ensemble (diversity 0
    # every epoch: MATE collapses to a single ensemble teacher); "deeper" gives each teacher
    # its own exits j..K, and they stay apart.
    loss = {**STATIC_ONE_LIKE, "teacher_init": "uniform", "teacher_support": support}
    job = build_job(digits_job(loss, epochs=20))
    history = []
    final = fit(job, on_epoch=history.append)
    weights = _learns_and_reports_teachers(final, teacher_acc=0.90)
    assert final[M.EPOCH] == 20
    assert 0.0 < final[M.ANYTIME_AUC] < 1.0
    assert final[M.ANYTIME_GFLOPS] <= job.gflops[-1] + 1e-12
    # The teacher weights are trained: they moved away from their initial values.
    assert not torch.allclose(job.teacher_logits, init_teacher_logits(4, "uniform"))
    diversity = [m[M.TEACHER_DIVERSITY] for m in history]
    if support == "all":
        assert max(diversity) < 1e-6  # identical up to float rounding
        torch.testing.assert_close(weights, weights[:1].expand(4, -1))
    else:
        assert min(diversity) > 0.25
        assert not weights.tril(diagonal=-1).any()  # no teacher uses a shallower exit
    assert all(final[M.teacher_spread(j)] == 0.0 for j in range(1, 5))  # one vector for all


def test_fit_mate_attention_learns_per_sample_teachers_that_cost_no_inference_flops():
    # The defaults: the weight network, OKDDip's combination, the ramp-up.
    job = build_job(digits_job({"kd_weight": None}, epochs=6))
    network = job.model.weight_network
    assert job.teacher_logits is None and network is not None
    assert job.cfg.loss.kd_weight == 1.0 and job.cfg.loss.teacher_ce == "none"
    start = [p.detach().clone() for p in network.parameters()]
    history = []
    final = fit(job, on_epoch=history.append)
    _learns_and_reports_teachers(final, teacher_acc=0.85)
    # Trained through the attached KL targets, and per sample: the weights vary across images.
    assert any(not torch.equal(a, b) for a, b in zip(start, network.parameters(), strict=True))
    assert all(0.0 < final[M.teacher_spread(j)] < 1.0 for j in range(1, 5))
    assert all(0.0 <= m[M.TEACHER_DIVERSITY] <= 1.0 for m in history)
    # The weight network serves training only: inference cost is that of the plain network.
    plain = build_job(digits_job({"kind": "dsn"}, epochs=1))
    assert plain.model.weight_network is None
    assert job.gflops == plain.gflops


def test_mate_attention_weights_follow_teacher_lr_and_weight_decay():
    job = build_job(digits_job({"kd_weight": None}, epochs=1))
    groups = job.optimizer.param_groups
    attention = {id(p) for p in job.model.weight_network.parameters()}
    assert {id(p) for p in groups[1]["params"]} == attention
    assert not attention & {id(p) for p in groups[0]["params"]}
    assert groups[1]["weight_decay"] == groups[0]["weight_decay"] == 5e-4  # as OKDDip
    fast = build_job(digits_job({"kd_weight": None}, {"teacher_lr": 1.0}, epochs=1))
    assert fast.optimizer.param_groups[1]["lr"] == 1.0


def test_fit_reports_each_epoch_in_order():
    seen = []
    fit(build_job(digits_job(epochs=3)), on_epoch=lambda m: seen.append(m[M.EPOCH]))
    assert seen == [1, 2, 3]


def test_an_epoch_reports_each_exits_training_cross_entropy():
    """DSN's loss is the sum of its exits' cross entropies, so the epoch's means add up."""
    metrics = train_one_epoch(build_job(digits_job({"kind": "dsn"}, epochs=1)))
    per_exit = [metrics[M.exit_loss(k, "train")] for k in range(1, 5)]
    assert all(0.0 < ce < 10.0 for ce in per_exit), per_exit
    assert sum(per_exit) == pytest.approx(metrics[M.TRAIN_LOSS], rel=1e-5)


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    ("loss", "epochs", "stop"),
    [
        ({}, 8, 5),  # MATE: the attention weight network and the ramp-up across the stop
        (STATIC_ONE_LIKE, 4, 2),  # MATE's static teacher weights in the checkpoint
        # Phuong-Lampert's annealed temperature and the projection heads in the checkpoint
        ({"kind": "phuong_lampert", "temperature": None, "correlation_weight": 1.0}, 4, 2),
    ],
)
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, loss, epochs, stop):
    cfg = digits_job(loss, epochs=epochs)
    uninterrupted = fit(build_job(cfg))

    first = build_job(cfg)

    def stop_early(metrics):
        if metrics[M.EPOCH] == stop:
            save_checkpoint(first, tmp_path)
            raise _Stop

    with pytest.raises(_Stop):
        fit(first, on_epoch=stop_early)
    torch.manual_seed(1234)  # a different global RNG state must not matter after loading
    resumed_job = build_job(cfg)
    load_checkpoint(resumed_job, tmp_path)
    assert resumed_job.epoch == stop
    resumed = fit(resumed_job)
    assert set(M.epoch_metric_names(4, cfg.loss.kind)) <= set(resumed)
    for name, value in uninterrupted.items():
        if name != M.EPOCH_TIME:
            assert resumed[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name


def test_non_finite_loss_stops_with_clear_error():
    job = build_job(digits_job(epochs=2))
    with torch.no_grad():
        next(job.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="training loss is nan in epoch 1; lower optim.lr"):
        train_one_epoch(job)


def test_bf16_precision_runs_on_cpu(monkeypatch):
    # As on a CPU without bf16 instructions, whatever this one has: the warning's rule alone.
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = digits_job(epochs=2, precision="bf16")  # a quarter of digits: bf16 is emulated
        job = build_job(apply_overrides(cfg, {"dataset.train_fraction": 0.25}, source="test"))
        assert job.autocast_dtype == torch.bfloat16
        final = fit(job)
    # Warned once, when the job was built: not again in each epoch's training and evaluation.
    assert [str(w.message) for w in caught].count(EMULATED_BF16_WARNING) == 1
    assert math.isfinite(final[M.TRAIN_LOSS])


def test_lr_factor_follows_schedule():
    cosine = OptimConfig(schedule="cosine")
    assert lr_factor(cosine, 10, 0) == 1.0
    assert lr_factor(cosine, 10, 5) == pytest.approx(0.5)
    multistep = OptimConfig(schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(multistep, 8, e) for e in (0, 3, 4, 6)] == pytest.approx([1, 1, 0.1, 0.01])
    warm = OptimConfig(schedule="constant", warmup_epochs=3)
    assert [lr_factor(warm, 10, e) for e in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1, 1])
