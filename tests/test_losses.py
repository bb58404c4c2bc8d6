"""Tests for trainer/losses.py.

Expected values are written out from DESIGN §3 with plain `math` on tiny lists, or come from
the pairwise-loop reference in tests/reference_losses.py, never from the module's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_losses import naive_mate_loss
from trainer.config import DTDConfig, LossConfig
from trainer.losses import (
    correlation_loss,
    dynamic_temperature,
    ensemble_teachers,
    init_teacher_logits,
    multi_exit_loss,
    soft_targets,
)

# ---------------------------------------------------------------------------------------------
# Hand-computation helpers on python lists
# ---------------------------------------------------------------------------------------------


def _softmax(v: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(x / t) for x in v]
    return [x / sum(e) for x in e]


def _ce(v: list[float], y: int) -> float:
    return -math.log(_softmax(v)[y])


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def _soft_ce(p: list[float], q: list[float]) -> float:
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q, strict=True))


def _kl_t(teacher: list[float], student: list[float], t: float) -> float:
    """KL_T(softmax(teacher/T) || student) = T^2 KL(softmax(teacher/T) || softmax(student/T))."""
    return t * t * _kl(_softmax(teacher, t), _softmax(student, t))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _mix(weights: list[float], vectors: list[list[float]]) -> list[float]:
    return [sum(w * v[c] for w, v in zip(weights, vectors, strict=True)) for c in range(3)]


# K=2 exits, B=2 samples, C=3 classes, D=2 feature dims.
Z1 = [[1.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
Z2 = [[2.0, 0.5, 0.0], [0.0, 0.0, 1.0]]  # right on sample 0, wrong (argmax 2) on sample 1
Y = [0, 1]
F1 = [[1.0, -1.0], [0.5, 2.0]]
F2 = [[-0.5, -2.0], [1.0, -1.0]]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor([Z1, Z2]), torch.tensor([F1, F2]), torch.tensor(Y)


def _sum_ce(*exits: list[list[float]]) -> float:
    return sum(_mean([_ce(z[i], Y[i]) for i in range(2)]) for z in exits)


def _random_inputs(k: int, b: int = 8, c: int = 5, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(k, b, c, generator=g)
    features = torch.randn(k, b, d, generator=g)
    labels = torch.randint(0, c, (b,), generator=g)
    a = 0.5 * torch.randn(k, k, generator=g)
    # Make the last teacher right on every other sample, so both knowledge-adjustment
    # branches (teacher right / wrong) occur.
    teacher = torch.einsum("k,kbc->bc", torch.softmax(a[-1], dim=0), logits)
    labels[::2] = teacher.argmax(dim=-1)[::2]
    return logits, features, labels, a


# ---------------------------------------------------------------------------------------------
# Each kind against a hand computation
# ---------------------------------------------------------------------------------------------


def test_multi_exit_loss_dsn_matches_hand_computation():
    out = multi_exit_loss(LossConfig(kind="dsn"), *_inputs())
    assert out.total.item() == pytest.approx(_sum_ce(Z1, Z2), rel=1e-6)


def test_multi_exit_loss_byot_matches_hand_computation():
    a, t, b = 0.1, 3.0, 0.1
    cfg = LossConfig(kind="byot", temperature=t, feature_weight=b)
    assert cfg.kd_weight == a
    soft = _mean([_soft_ce(_softmax(Z2[i], t), _softmax(Z1[i], t)) for i in range(2)])
    # Masked squared distance: sample 0 keeps dim 0 only (dim 1 is <= 0 in both):
    # (1 - -0.5)^2 = 2.25; sample 1 keeps both: (0.5 - 1)^2 + (2 - -1)^2 = 9.25.
    hint = _mean([2.25, 9.25])
    expected = (1 - a) * _sum_ce(Z1, Z2) + a * t * t * soft + b * hint
    assert multi_exit_loss(cfg, *_inputs()).total.item() == pytest.approx(expected, rel=1e-6)


def test_multi_exit_loss_eed_matches_hand_computation():
    c, t = 1.0, 3.0
    cfg = LossConfig(kind="eed", temperature=t)
    assert cfg.kd_weight == c
    teacher = [[(u + v) / 2 for u, v in zip(Z1[i], Z2[i], strict=True)] for i in range(2)]
    kd = sum(_mean([_kl_t(teacher[i], z[i], t) for i in range(2)]) for z in (Z1, Z2))
    expected = _sum_ce(Z1, Z2) + c * kd
    assert multi_exit_loss(cfg, *_inputs()).total.item() == pytest.approx(expected, rel=1e-6)


def test_multi_exit_loss_phuong_lampert_matches_hand_computation():
    c, t = 0.5, 2.0
    cfg = LossConfig(kind="phuong_lampert", temperature=t)
    assert cfg.kd_weight == c
    kd = _mean([_kl_t(Z2[i], Z1[i], t) for i in range(2)])
    expected = (1 - c) * _sum_ce(Z1, Z2) + c * kd
    assert multi_exit_loss(cfg, *_inputs()).total.item() == pytest.approx(expected, rel=1e-6)


def test_multi_exit_loss_mate_matches_hand_computation():
    lam, mu, t = 0.5, 0.7, 3.0
    cfg = LossConfig(kind="mate", temperature=t, primary_weight=mu)
    a = [[0.0, 1.0], [0.5, -0.5]]
    w = [_softmax(row) for row in a]
    teachers = [[_mix(w[j], [Z1[i], Z2[i]]) for i in range(2)] for j in range(2)]  # [J][B]
    exits = [Z1, Z2]
    teacher_ce = sum(_mean([_ce(teachers[j][i], Y[i]) for i in range(2)]) for j in range(2))
    kd = 0.0
    for k in range(2):
        other = 1 - k
        kd += mu * _mean([_kl_t(teachers[k][i], exits[k][i], t) for i in range(2)])
        kd += (1 - mu) * _mean([_kl_t(teachers[other][i], exits[k][i], t) for i in range(2)])
    expected = (1 - lam) * _sum_ce(Z1, Z2) + teacher_ce + lam * kd
    out = multi_exit_loss(cfg, *_inputs(), teacher_logits=torch.tensor(a))
    assert out.total.item() == pytest.approx(expected, rel=1e-6)


def test_multi_exit_loss_mate_primary_weight_one_keeps_only_primary_teachers():
    # K=3 with mu=1: the KL part is sum_k KL_T(t_k || z_k) only.
    lam, t = 0.5, 3.0
    cfg = LossConfig(kind="mate", temperature=t, primary_weight=1.0)
    z3 = [[0.0, 1.0, 0.0], [1.0, 0.0, -0.5]]
    exits = [Z1, Z2, z3]
    a = [[0.3, -0.2, 0.1], [0.0, 0.5, 1.0], [-1.0, 0.0, 2.0]]
    w = [_softmax(row) for row in a]
    teachers = [[_mix(w[j], [e[i] for e in exits]) for i in range(2)] for j in range(3)]
    teacher_ce = sum(_mean([_ce(teachers[j][i], Y[i]) for i in range(2)]) for j in range(3))
    kd = sum(_mean([_kl_t(teachers[k][i], exits[k][i], t) for i in range(2)]) for k in range(3))
    expected = (1 - lam) * _sum_ce(*exits) + teacher_ce + lam * kd
    logits = torch.tensor(exits)
    features = torch.zeros(3, 2, 4)
    out = multi_exit_loss(cfg, logits, features, torch.tensor(Y), teacher_logits=torch.tensor(a))
    assert out.total.item() == pytest.approx(expected, rel=1e-6)


def test_multi_exit_loss_phuong_lampert_with_dtd_and_lsr_matches_hand_computation():
    # Teacher Z2 is right on sample 0 and wrong on sample 1; cwsm weights from the student Z1.
    t0, beta = 4.0, 2.0
    cfg = LossConfig(
        kind="phuong_lampert",
        dtd=DTDConfig(t0=t0, beta=beta, weighting="cwsm"),
        teacher_adjust="lsr",
    )
    w = [1.0 / (max(_softmax(Z1[i])) + 1e-3) for i in range(2)]
    tau = [max(t0 + beta * (_mean(w) - w[i]), 0.1) for i in range(2)]
    targets = [_softmax(Z2[0], tau[0]), [0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3]]
    kd = _mean([tau[i] ** 2 * _kl(targets[i], _softmax(Z1[i], tau[i])) for i in range(2)])
    expected = 0.5 * _sum_ce(Z1, Z2) + 0.5 * kd
    assert multi_exit_loss(cfg, *_inputs()).total.item() == pytest.approx(expected, rel=1e-6)


def test_multi_exit_loss_dsn_ignores_modifiers():
    plain = multi_exit_loss(LossConfig(kind="dsn"), *_inputs()).total
    cfg = LossConfig(kind="dsn", dtd=DTDConfig(), teacher_adjust="ps", correlation_weight=1.0)
    assert multi_exit_loss(cfg, *_inputs()).total.item() == pytest.approx(plain.item())


def test_multi_exit_loss_per_exit_ce_is_detached_ce_of_each_exit():
    logits, features, labels = _inputs()
    logits.requires_grad_(True)
    out = multi_exit_loss(LossConfig(kind="phuong_lampert"), logits, features, labels)
    assert not out.per_exit_ce.requires_grad
    expected = [_mean([_ce(z[i], Y[i]) for i in range(2)]) for z in (Z1, Z2)]
    assert out.per_exit_ce.tolist() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# MATE: gradients, single exit, batched == naive
# ---------------------------------------------------------------------------------------------


def test_multi_exit_loss_mate_gradients_reach_teacher_weights_and_every_exit():
    logits, features, labels, _ = _random_inputs(4)
    logits.requires_grad_(True)
    a = init_teacher_logits(4, "deeper").requires_grad_(True)
    multi_exit_loss(LossConfig(kind="mate"), logits, features, labels, a).total.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert (logits.grad.flatten(1).abs().sum(dim=1) > 0).all()


def test_multi_exit_loss_mate_teacher_weights_learn_only_from_teacher_ce():
    # Teachers are detached inside the KL terms: a_j's gradient is that of sum_j CE(t_j).
    logits, features, labels, a = _random_inputs(3)
    a1 = a.clone().requires_grad_(True)
    multi_exit_loss(LossConfig(kind="mate"), logits, features, labels, a1).total.backward()
    a2 = a.clone().requires_grad_(True)
    teachers = torch.einsum("jk,kbc->jbc", torch.softmax(a2, dim=1), logits)
    sum(torch.nn.functional.cross_entropy(t, labels) for t in teachers).backward()
    torch.testing.assert_close(a1.grad, a2.grad)


KINDS = ["dsn", "byot", "eed", "phuong_lampert", "mate"]
ALL_MODIFIERS = {
    "dtd": DTDConfig(weighting="flsw"),
    "teacher_adjust": "ps",
    "correlation_weight": 0.1,
}


@pytest.mark.parametrize("kind", KINDS)
def test_multi_exit_loss_single_exit_is_finite(kind):
    logits, features, labels, a = _random_inputs(1)
    cfg = LossConfig(kind=kind, primary_weight=0.3, **ALL_MODIFIERS)
    out = multi_exit_loss(cfg, logits, features, labels, a)
    assert torch.isfinite(out.total)


@pytest.mark.parametrize("num_exits", [1, 2, 4])
@pytest.mark.parametrize("dtd", [None, "cwsm", "flsw"])
@pytest.mark.parametrize("adjust", ["none", "lsr", "ps"])
def test_multi_exit_loss_mate_matches_naive_pairwise_reference(num_exits, dtd, adjust):
    cfg = LossConfig(
        kind="mate",
        primary_weight=0.6,
        dtd=None if dtd is None else DTDConfig(t0=3.0, beta=1.5, weighting=dtd, gamma=2.0),
        teacher_adjust=adjust,
        correlation_weight=0.3,
    )
    logits, features, labels, a = _random_inputs(num_exits, seed=num_exits)
    teachers = torch.einsum("jk,kbc->jbc", torch.softmax(a, dim=1), logits)
    right = teachers.argmax(-1) == labels
    assert right.any() and not right.all()  # the fixture exercises both adjustment branches

    grads = []
    for loss_fn in (multi_exit_loss, naive_mate_loss):
        z = logits.clone().requires_grad_(True)
        f = features.clone().requires_grad_(True)
        w = a.clone().requires_grad_(True)
        out = loss_fn(cfg, z, f, labels, w)
        total = out.total if isinstance(out, tuple) else out
        total.backward()
        grads.append((total.detach(), z.grad, f.grad, w.grad))
    for batched, naive in zip(*grads, strict=True):
        if naive is None:  # features get no gradient without the correlation term
            assert batched is None or not batched.any()
        else:
            torch.testing.assert_close(batched, naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_multi_exit_loss_finite_under_bf16_autocast(kind):
    logits, features, labels, a = _random_inputs(3, b=16, c=10)
    logits = (10 * logits).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multi_exit_loss(
            LossConfig(kind=kind, **ALL_MODIFIERS), logits, features.bfloat16(), labels, a
        )
    assert out.total.dtype == torch.float32
    assert torch.isfinite(out.total)
    out.total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def test_multi_exit_loss_rejects_logits_without_exit_axis():
    with pytest.raises(ValueError, match=r"logits has shape \(2, 3\), but must be \[K, B, C\]"):
        multi_exit_loss(LossConfig(kind="dsn"), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2))


def test_multi_exit_loss_rejects_features_of_other_exits():
    logits, _, labels = _inputs()
    with pytest.raises(ValueError, match=r"features has shape \(3, 2, 2\)"):
        multi_exit_loss(LossConfig(kind="dsn"), logits, torch.zeros(3, 2, 2), labels)


def test_multi_exit_loss_rejects_labels_of_other_batch():
    logits, features, _ = _inputs()
    with pytest.raises(ValueError, match=r"labels has shape \(3,\), but must be \[2\]"):
        multi_exit_loss(LossConfig(kind="dsn"), logits, features, torch.zeros(3, dtype=torch.long))


def test_multi_exit_loss_mate_requires_teacher_logits():
    with pytest.raises(ValueError, match="needs teacher_logits"):
        multi_exit_loss(LossConfig(kind="mate"), *_inputs())


def test_multi_exit_loss_mate_rejects_teacher_logits_of_wrong_shape():
    with pytest.raises(
        ValueError, match=r"teacher_logits has shape \(3, 3\), but must be \[2, 2\]"
    ):
        multi_exit_loss(LossConfig(kind="mate"), *_inputs(), teacher_logits=torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def test_dynamic_temperature_cwsm_matches_formula():
    dtd = DTDConfig(t0=4.0, beta=2.0, weighting="cwsm")
    student, teacher = torch.tensor([Z1, Z2]), torch.tensor([Z2])  # K=2, J=1
    tau = dynamic_temperature(dtd, student, teacher)
    assert tau.shape == (1, 2, 2)
    for k, z in enumerate((Z1, Z2)):
        w = [1.0 / (max(_softmax(z[i])) + 1e-3) for i in range(2)]
        expected = [4.0 + 2.0 * (_mean(w) - w[i]) for i in range(2)]
        assert tau[0, k].tolist() == pytest.approx(expected, rel=1e-6)


def test_dynamic_temperature_flsw_matches_formula():
    dtd = DTDConfig(t0=3.0, beta=1.0, weighting="flsw", gamma=2.0)
    student, teacher = torch.tensor([Z1]), torch.tensor([Z2, Z1])  # K=1, J=2
    tau = dynamic_temperature(dtd, student, teacher)
    assert tau.shape == (2, 1, 2)

    def cos(u: list[float], v: list[float]) -> float:
        dot = sum(x * y for x, y in zip(u, v, strict=True))
        return dot / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    for j, t in enumerate((Z2, Z1)):
        w = [(1.0 - cos(Z1[i], t[i])) ** 2.0 for i in range(2)]
        expected = [3.0 + 1.0 * (_mean(w) - w[i]) for i in range(2)]
        assert tau[j, 0].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_dynamic_temperature_is_clamped_at_one_tenth():
    dtd = DTDConfig(t0=0.5, beta=50.0, weighting="cwsm")
    student = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # confident, uniform
    tau = dynamic_temperature(dtd, student, student)
    assert tau[0, 0, 1].item() == pytest.approx(0.1)
    assert tau[0, 0, 0].item() > 0.5


def test_soft_targets_lsr_replaces_only_wrong_teacher_rows():
    teacher = torch.tensor(Z2)  # right on sample 0, wrong on sample 1
    log_p = soft_targets(teacher, torch.tensor(Y), torch.tensor(2.0), "lsr")
    assert log_p.exp()[0].tolist() == pytest.approx(_softmax(Z2[0], 2.0), rel=1e-6)
    assert log_p.exp()[1].tolist() == pytest.approx([0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3], rel=1e-6)


def test_soft_targets_ps_swaps_argmax_and_label_only_for_wrong_rows():
    teacher = torch.tensor(Z2)
    log_p = soft_targets(teacher, torch.tensor(Y), torch.tensor(2.0), "ps")
    p1 = _softmax(Z2[1], 2.0)  # argmax 2, label 1
    assert log_p.exp()[0].tolist() == pytest.approx(_softmax(Z2[0], 2.0), rel=1e-6)
    assert log_p.exp()[1].tolist() == pytest.approx([p1[0], p1[2], p1[1]], rel=1e-6)


def test_soft_targets_uses_per_sample_temperature():
    tau = torch.tensor([1.0, 4.0])
    p = soft_targets(torch.tensor(Z2), torch.tensor(Y), tau).exp()
    assert p[0].tolist() == pytest.approx(_softmax(Z2[0], 1.0), rel=1e-6)
    assert p[1].tolist() == pytest.approx(_softmax(Z2[1], 4.0), rel=1e-6)


def test_soft_targets_rejects_unknown_adjustment():
    with pytest.raises(ValueError, match="teacher_adjust is 'xx'"):
        soft_targets(torch.tensor(Z2), torch.tensor(Y), torch.tensor(1.0), "xx")


def test_correlation_loss_zero_when_student_features_equal_final():
    f = torch.randn(1, 8, 5).expand(3, -1, -1)
    assert correlation_loss(f).item() == pytest.approx(0.0, abs=1e-6)


def test_correlation_loss_positive_when_features_differ():
    f = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(1))
    assert correlation_loss(f).item() > 1e-3


def test_ensemble_teachers_is_softmax_weighted_sum_of_exits():
    logits = torch.tensor([Z1, Z2])
    a = [[0.0, 1.0], [2.0, -1.0]]
    t = ensemble_teachers(logits, torch.tensor(a))
    for j in range(2):
        w = _softmax(a[j])
        for i in range(2):
            assert t[j, i].tolist() == pytest.approx(_mix(w, [Z1[i], Z2[i]]), rel=1e-6)


def test_init_teacher_logits_uniform_weighs_all_exits_equally():
    w = init_teacher_logits(4, "uniform").softmax(dim=1)
    torch.testing.assert_close(w, torch.full((4, 4), 0.25))


def test_init_teacher_logits_deeper_is_uniform_over_exits_j_to_k():
    a = init_teacher_logits(4, "deeper")
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    w = a.softmax(dim=1)
    for j in range(4):
        deeper, shallower = w[j, j:], w[j, :j]
        torch.testing.assert_close(deeper, deeper[:1].expand_as(deeper))
        torch.testing.assert_close(shallower, deeper[0] / 100 * torch.ones_like(shallower))
        assert deeper.sum() > 0.95
    assert w[3, 3] > 0.97


def test_init_teacher_logits_next_favours_the_next_exit():
    w = init_teacher_logits(4, "next").softmax(dim=1)
    assert w.argmax(dim=1).tolist() == [1, 2, 3, 3]
    assert (w.amax(dim=1) > 0.97).all()


def test_init_teacher_logits_single_exit():
    for mode in ("deeper", "uniform", "next"):
        assert init_teacher_logits(1, mode).softmax(dim=1).tolist() == [[1.0]]


def test_init_teacher_logits_rejects_unknown_mode():
    with pytest.raises(ValueError, match="teacher_init is 'deepest'"):
        init_teacher_logits(3, "deepest")
