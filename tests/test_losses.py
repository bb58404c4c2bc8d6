"""Tests for trainer/losses.py.

Expected values are written out from docs/design.md §3 with plain `math` on tiny lists, or come from
tests/reference_losses.py (the authors' computations transcribed, and MATE's pairwise
loops), never from the module's helpers.
"""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch

from reference_losses import (
    PhuongLampertReference,
    byot_reference,
    consistency_rampup,
    dlkd_correlation_reference,
    eed_reference,
    naive_mate_loss,
    okddip_group_targets,
)
from trainer.config import DEFAULT_KD_RAMPUP, DTDConfig, LossConfig, ModelConfig
from trainer.losses import (
    annealed_temperature,
    correlation_loss,
    dynamic_temperature,
    init_teacher_logits,
    mix_exits,
    multi_exit_loss,
    rampup,
    soft_targets,
    teacher_weights,
)
from trainer.models import create_model
from trainer.models.heads import TeacherAttention

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
    """logits [k, b, c], post-ReLU-like features [k, b, d] (some units off), labels, teacher
    logits a [k, k] and projections [k-1, b, d]."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(k, b, c, generator=g)
    features = torch.randn(k, b, d, generator=g).clamp(min=-0.2)
    labels = torch.randint(0, c, (b,), generator=g)
    a = 0.5 * torch.randn(k, k, generator=g)
    projections = torch.randn(k - 1, b, d, generator=g)
    # Make the last teacher right on every other sample, so both knowledge-adjustment
    # branches (teacher right / wrong) occur.
    teacher = torch.einsum("k,kbc->bc", torch.softmax(a[-1], dim=0), logits)
    labels[::2] = teacher.argmax(dim=-1)[::2]
    return logits, features, labels, a, projections


def _loss_and_grads(loss_fn, *inputs: torch.Tensor, **kwargs):
    """(value, gradient of every floating-point input) of loss_fn(*inputs); inputs are cloned,
    None stays None."""
    leaves = [
        x.clone().requires_grad_(True) if x is not None and x.is_floating_point() else x
        for x in inputs
    ]
    value = loss_fn(*leaves, **kwargs)
    value = value.total if isinstance(value, tuple) else value
    value.backward()
    grads = [x.grad for x in leaves if x is not None and x.is_floating_point()]
    return value.detach(), grads


def _assert_same(ours, reference, grad_slack: float = 0.0) -> None:
    """Values and gradients agree to 1e-5 relative (a missing gradient counts as zero);
    gradient entries near zero get `grad_slack` times the gradient's largest entry as
    absolute slack (at least 1e-7)."""
    (value, grads), (ref_value, ref_grads) = ours, reference
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        if ref_grad is None:
            assert grad is None or not grad.any()
        else:
            atol = max(1e-7, grad_slack * ref_grad.abs().max().item())
            torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=atol)


# ---------------------------------------------------------------------------------------------
# Each kind against a hand computation
# ---------------------------------------------------------------------------------------------


def test_multi_exit_loss_dsn_matches_hand_computation():
    out = multi_exit_loss(LossConfig(kind="dsn"), *_inputs())
    assert out.total.item() == pytest.approx(_sum_ce(Z1, Z2), rel=1e-6)


def test_multi_exit_loss_byot_matches_hand_computation():
    a, t, b = 0.1, 3.0, 0.1
    cfg = LossConfig(kind="byot", feature_weight=b)
    assert (cfg.kd_weight, cfg.temperature) == (a, t)
    soft = _mean([_soft_ce(_softmax(Z2[i], t), _softmax(Z1[i], t)) for i in range(2)])
    # Masked squared distance: sample 0 keeps dim 0 only (dim 1 is <= 0 in both):
    # (1 - -0.5)^2 = 2.25; sample 1 keeps both: (0.5 - 1)^2 + (2 - -1)^2 = 9.25; summed over
    # the batch, as the authors' code does.
    hint = 2.25 + 9.25
    expected = (1 - a) * _sum_ce(Z1, Z2) + a * t * t * soft + b * hint
    assert multi_exit_loss(cfg, *_inputs()).total.item() == pytest.approx(expected, rel=1e-6)


def _exit_mean(vectors: list[list[list[float]]]) -> list[list[float]]:
    """Elementwise mean over exits of [K][B][D] lists -> [B][D]."""
    k = len(vectors)
    return [
        [sum(v[i][d] for v in vectors) / k for d in range(len(vectors[0][i]))] for i in range(2)
    ]


def _eed_feature_term() -> float:
    fbar = _exit_mean([F1, F2])  # [[0.25, -1.5], [0.75, 0.5]]
    total = 0.0
    for f in (F1, F2):
        sq = [
            (f[i][d] - fbar[i][d]) ** 2 if f[i][d] > 0 or fbar[i][d] > 0 else 0.0
            for i in range(2)
            for d in range(2)
        ]
        total += _mean(sq)  # mean over batch and dimensions
    return total


def test_multi_exit_loss_eed_mse_matches_hand_computation():
    cfg = LossConfig(kind="eed")
    assert (cfg.eed_output, cfg.kd_weight, cfg.feature_weight) == ("mse", 1.0, 1.0)
    zbar = _exit_mean([Z1, Z2])
    mse = sum(
        _mean([(z[i][c] - zbar[i][c]) ** 2 for i in range(2) for c in range(3)]) for z in (Z1, Z2)
    )
    expected = _sum_ce(Z1, Z2) + mse + _eed_feature_term()
    assert multi_exit_loss(cfg, *_inputs()).total.item() == pytest.approx(expected, rel=1e-6)


def test_multi_exit_loss_eed_kl_matches_hand_computation():
    t = 3.0
    cfg = LossConfig(kind="eed", eed_output="kl")
    assert (cfg.kd_weight, cfg.temperature) == (0.1, t)
    zbar = _exit_mean([Z1, Z2])
    soft = sum(
        _mean([_soft_ce(_softmax(zbar[i], t), _softmax(z[i], t)) for i in range(2)])
        for z in (Z1, Z2)
    )
    expected = _sum_ce(Z1, Z2) + 0.1 * t * t * soft + _eed_feature_term()
    assert multi_exit_loss(cfg, *_inputs()).total.item() == pytest.approx(expected, rel=1e-6)


def test_multi_exit_loss_phuong_lampert_matches_hand_computation():
    c, t = 0.5, 2.0
    cfg = LossConfig(kind="phuong_lampert", temperature=t)
    assert cfg.kd_weight == c
    soft = _mean([_soft_ce(_softmax(Z2[i], t), _softmax(Z1[i], t)) for i in range(2)])
    expected = 10 / 2 * ((1 - c) * _sum_ce(Z1, Z2) + c * t * t * soft)  # scale 2 * 5 / K
    assert multi_exit_loss(cfg, *_inputs()).total.item() == pytest.approx(expected, rel=1e-6)
    # The engine's annealed temperature replaces the configured one.
    out = multi_exit_loss(cfg.model_copy(update={"temperature": 7.0}), *_inputs(), temperature=t)
    assert out.total.item() == pytest.approx(expected, rel=1e-6)


# The earlier reconstruction: teacher CE reaching the exits, detached targets, CE 1 - lambda.
ONE_LIKE = {"teacher_ce": "exits", "detach_targets": True, "exit_ce_weight": "one_minus_kd"}


def test_multi_exit_loss_mate_matches_hand_computation():
    lam, mu, t = 0.5, 0.7, 3.0
    cfg = LossConfig(kind="mate", temperature=t, primary_weight=mu, kd_weight=lam, **ONE_LIKE)
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
    cfg = LossConfig(kind="mate", temperature=t, primary_weight=1.0, kd_weight=lam, **ONE_LIKE)
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


def test_multi_exit_loss_mate_defaults_match_hand_computation():
    # OKDDip's combination: exits' CE weighted 1, no CE on the teachers, lambda = 1, and the
    # distillation weight scaled by this epoch's ramp-up factor.
    mu, t, ramp = 0.7, 3.0, 0.25
    cfg = LossConfig(kind="mate", primary_weight=mu)
    assert (cfg.kd_weight, cfg.temperature, cfg.teacher_ce, cfg.exit_ce_weight) == (
        1.0,
        t,
        "none",
        "one",
    )
    a = [[0.0, 1.0], [0.5, -0.5]]
    w = [_softmax(row) for row in a]
    teachers = [[_mix(w[j], [Z1[i], Z2[i]]) for i in range(2)] for j in range(2)]
    exits = [Z1, Z2]
    kd = 0.0
    for k in range(2):
        kd += mu * _mean([_kl_t(teachers[k][i], exits[k][i], t) for i in range(2)])
        kd += (1 - mu) * _mean([_kl_t(teachers[1 - k][i], exits[k][i], t) for i in range(2)])
    expected = _sum_ce(Z1, Z2) + ramp * kd
    out = multi_exit_loss(cfg, *_inputs(), teacher_logits=torch.tensor(a), kd_rampup=ramp)
    assert out.total.item() == pytest.approx(expected, rel=1e-6)
    # Per-sample scores: sample 1 uses the other row order; each sample mixes with its own.
    per_sample = torch.tensor([a, a[::-1]])
    w2 = [w, w[::-1]]
    teachers = [[_mix(w2[i][j], [Z1[i], Z2[i]]) for i in range(2)] for j in range(2)]
    kd = 0.0
    for k in range(2):
        kd += mu * _mean([_kl_t(teachers[k][i], exits[k][i], t) for i in range(2)])
        kd += (1 - mu) * _mean([_kl_t(teachers[1 - k][i], exits[k][i], t) for i in range(2)])
    out = multi_exit_loss(cfg, *_inputs(), teacher_logits=per_sample, kd_rampup=ramp)
    assert out.total.item() == pytest.approx(_sum_ce(Z1, Z2) + ramp * kd, rel=1e-6)


def test_multi_exit_loss_phuong_lampert_with_dtd_and_lsr_matches_hand_computation():
    # Teacher Z2 is right on sample 0 and wrong on sample 1; cwsm weights from the student Z1,
    # scaled by the batch's largest. Each sample's soft CE at its own tau, times t0^2.
    t0, beta = 4.0, 2.0
    cfg = LossConfig(
        kind="phuong_lampert",
        dtd=DTDConfig(t0=t0, beta=beta, weighting="cwsm"),
        teacher_adjust="lsr",
    )
    w = [1.0 / (max(_softmax(Z1[i])) + 1e-3) for i in range(2)]
    w = [x / max(w) for x in w]
    tau = [max(t0 + beta * (_mean(w) - w[i]), 0.1) for i in range(2)]
    targets = [_softmax(Z2[0], tau[0]), [0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3]]
    kd = t0**2 * _mean([_soft_ce(targets[i], _softmax(Z1[i], tau[i])) for i in range(2)])
    expected = 10 / 2 * (0.5 * _sum_ce(Z1, Z2) + 0.5 * kd)
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
# Parity with the authors' code, transcribed in tests/reference_losses.py
# ---------------------------------------------------------------------------------------------


# luanyunteng/pytorch-be-your-own-teacher, train.py @ 8f052ad836bafae6426a68a5617ae39b2aa73b78
def test_byot_matches_reference_values_and_gradients():
    logits, features, labels, _, _ = _random_inputs(4, seed=1)
    ours = _loss_and_grads(
        lambda z, f: multi_exit_loss(LossConfig(kind="byot"), z, f, labels), logits, features
    )
    reference = _loss_and_grads(
        lambda z, f: byot_reference(list(z), list(f), labels), logits, features
    )
    _assert_same(ours, reference)


# hjdw2/Exit-Ensemble-Distillation, train.py @ 146c9cf0e234ccdba3fa7573ca33822389f83bd7
@pytest.mark.parametrize(("eed_output", "reference_output"), [("mse", "MSE"), ("kl", "KL")])
def test_eed_matches_reference_values_and_gradients(eed_output, reference_output):
    logits, features, labels, _, _ = _random_inputs(4, seed=2)
    cfg = LossConfig(kind="eed", eed_output=eed_output)
    ours = _loss_and_grads(lambda z, f: multi_exit_loss(cfg, z, f, labels), logits, features)
    reference = _loss_and_grads(
        lambda z, f: eed_reference(list(z), list(f), labels, output=reference_output),
        logits,
        features,
    )
    _assert_same(ours, reference)


def _annealing_batches(steps: int, num_exits: int = 3):
    """Random logits per step; the final exit's confidence alternates between clearly above
    and clearly below 1/2 at T near 1, so the temperature both grows and holds."""
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        logits = torch.randn(num_exits, 16, 10, generator=g)
        logits[-1, :, 0] += 8.0 if step % 3 != 2 else 0.0
        yield logits, torch.randint(0, 10, (16,), generator=g)


def _reference_pl_step(logits, features, labels, *, reference):
    return reference(list(logits), labels)  # the reference has no feature term


# mary-phuong/multiexit-distillation, main.py (DistillationBasedLoss) and train_cifar.py
# @ 041fddf2e56e0f0b6d0bcb70c904edb1205e9936
def test_phuong_lampert_annealing_matches_reference_and_resumes_exactly(tmp_path):
    steps, stop = 8, 3
    cfg = LossConfig(kind="phuong_lampert")
    assert (cfg.temperature, cfg.anneal_factor, cfg.anneal_max_prob) == (1.0, 1.05, 0.5)
    reference = PhuongLampertReference(num_exits=3)
    temperature = torch.tensor(cfg.temperature)
    temperatures = []
    for step, (logits, labels) in enumerate(_annealing_batches(steps)):
        if step == stop:  # checkpoint and restore the state as the engine does
            torch.save({"temperature": temperature}, tmp_path / "state.pt")
            temperature = torch.load(tmp_path / "state.pt", weights_only=True)["temperature"]
        inputs = (logits, torch.zeros(3, 16, 2), labels)
        ours = _loss_and_grads(partial(multi_exit_loss, cfg), *inputs, temperature=temperature)
        _assert_same(ours, _loss_and_grads(_reference_pl_step, *inputs, reference=reference))
        temperature = annealed_temperature(temperature, logits[-1], 1.05, 0.5)
        assert temperature.item() == pytest.approx(reference.T, rel=1e-6)
        temperatures.append(reference.T)
    grew = [b > a for a, b in itertools.pairwise([1.0, *temperatures])]
    assert any(grew) and not all(grew)  # the sequence exercises both branches


# ifding/DLKD, helper/losses.py (CorrLoss) @ 666dd4ac701caf33010dfb2730ffa1fde4f04271
def test_correlation_matches_dlkd_reference_values_and_gradients():
    logits, features, labels, _, projections = _random_inputs(3, b=12, seed=4)
    cfg = LossConfig(kind="phuong_lampert", correlation_weight=2.0)

    def ours_fn(f, proj):
        with_term = multi_exit_loss(cfg, logits, f, labels, projections=proj).total
        without = multi_exit_loss(
            cfg.model_copy(update={"correlation_weight": 0.0}), logits, f, labels
        )
        return with_term - without.total

    def reference_fn(f, proj):
        return 2.0 * sum(dlkd_correlation_reference(proj[k], f[-1]) for k in range(2))

    ours = _loss_and_grads(ours_fn, features, projections)
    _assert_same(ours, _loss_and_grads(reference_fn, features, projections))
    assert ours[1][0] is None or not ours[1][0][-1].any()  # the final exit's features: no grad


# MATE against the pairwise loops of docs/design.md §3; its modifiers against TextBrewer's dtd
# (airaria/TextBrewer, src/textbrewer/schedulers.py @ d41c255fced4d7a995ae90d5aca5a8ab4073787c),
# the knowledge adjustments as "Preparing Lessons" describes them, and DLKD's CorrLoss.
@pytest.mark.parametrize(
    ("num_exits", "dtd", "adjust", "support", "knobs", "per_sample"),
    [
        *itertools.product(
            [1, 2, 4], [None, "cwsm", "flsw"], ["none", "lsr", "ps"], ["all"], [ONE_LIKE], [False]
        ),
        (4, None, "ps", "deeper", ONE_LIKE, False),
        (4, "flsw", "lsr", "deeper", ONE_LIKE, False),
        *(
            (4, *modifiers, knobs, per_sample)
            for modifiers in [
                (None, "none", "all"),
                ("flsw", "ps", "deeper"),
                ("cwsm", "lsr", "all"),
            ]
            for knobs in [
                {},  # the defaults: OKDDip's combination
                {"teacher_ce": "weights", "detach_targets": True},
                {"teacher_ce": "weights", "exit_ce_weight": "one_minus_kd", "kd_weight": 0.4},
                {"teacher_ce": "exits", "kd_weight": 2.0},
            ]
            for per_sample in [False, True]
        ),
    ],
)
def test_multi_exit_loss_mate_matches_naive_pairwise_reference(
    num_exits, dtd, adjust, support, knobs, per_sample
):
    cfg = LossConfig(
        kind="mate",
        primary_weight=0.6,
        teacher_support=support,
        dtd=None if dtd is None else DTDConfig(t0=3.0, beta=1.5, weighting=dtd, gamma=2.0),
        teacher_adjust=adjust,
        correlation_weight=0.3,
        **knobs,
    )
    logits, features, labels, a, projections = _random_inputs(num_exits, seed=num_exits)
    teachers = torch.einsum("jk,kbc->jbc", torch.softmax(a, dim=1), logits)
    right = teachers.argmax(-1) == labels
    assert right.any() and not right.all()  # the fixture exercises both adjustment branches
    if per_sample:  # the weight network's scores: the static ones, perturbed per sample
        g = torch.Generator().manual_seed(7)
        a = a + 0.5 * torch.randn(labels.shape[0], num_exits, num_exits, generator=g)
    inputs = (logits, features, labels, a, projections if num_exits > 1 else None)

    def batched(z, f, y, w, proj):
        return multi_exit_loss(cfg, z, f, y, w, projections=proj, kd_rampup=0.3)

    ours = _loss_and_grads(batched, *inputs)
    reference = _loss_and_grads(lambda *x: naive_mate_loss(cfg, *x, kd_rampup=0.3), *inputs)
    # Attached targets add paths through each teacher's softmax; against a float64 run of the
    # reference, ours and the float32 reference both err by ~1e-5 of the largest gradient.
    _assert_same(ours, reference, grad_slack=0.0 if cfg.detach_targets else 1e-5)


# ---------------------------------------------------------------------------------------------
# MATE: gradients, single exit, precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("knobs", [{}, ONE_LIKE, {"teacher_ce": "weights"}])
def test_multi_exit_loss_mate_gradients_reach_teacher_weights_and_every_exit(knobs):
    logits, features, labels, _, _ = _random_inputs(4)
    logits.requires_grad_(True)
    a = init_teacher_logits(4, "deeper").requires_grad_(True)
    multi_exit_loss(LossConfig(kind="mate", **knobs), logits, features, labels, a).total.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert (logits.grad.flatten(1).abs().sum(dim=1) > 0).all()


def test_multi_exit_loss_mate_teacher_weights_learn_only_from_teacher_ce():
    # Teachers are detached inside the KL terms: a_j's gradient is that of sum_j CE(t_j).
    logits, features, labels, a, _ = _random_inputs(3)
    cfg = LossConfig(kind="mate", **ONE_LIKE)
    a1 = a.clone().requires_grad_(True)
    multi_exit_loss(cfg, logits, features, labels, a1).total.backward()
    a2 = a.clone().requires_grad_(True)
    teachers = torch.einsum("jk,kbc->jbc", torch.softmax(a2, dim=1), logits)
    sum(torch.nn.functional.cross_entropy(t, labels) for t in teachers).backward()
    torch.testing.assert_close(a1.grad, a2.grad)


def test_multi_exit_loss_mate_teacher_ce_on_weights_does_not_reach_the_exits():
    # teacher_ce "weights" and "exits" give the weights the same gradient; the exits differ
    # exactly by the gradient of sum_j CE(t_j) with respect to the exit logits.
    logits, features, labels, a, _ = _random_inputs(3)
    grads = {}
    for where in ("weights", "exits"):
        z = logits.clone().requires_grad_(True)
        scores = a.clone().requires_grad_(True)
        cfg = LossConfig(kind="mate", teacher_ce=where, detach_targets=True)
        multi_exit_loss(cfg, z, features, labels, scores).total.backward()
        grads[where] = (z.grad, scores.grad)
    z = logits.clone().requires_grad_(True)
    teachers = torch.einsum("jk,kbc->jbc", torch.softmax(a, dim=1), z)
    sum(torch.nn.functional.cross_entropy(t, labels) for t in teachers).backward()
    torch.testing.assert_close(grads["weights"][1], grads["exits"][1])
    torch.testing.assert_close(grads["exits"][0] - grads["weights"][0], z.grad)


def test_multi_exit_loss_mate_deeper_support_ignores_shallower_exits():
    logits, features, labels, a, _ = _random_inputs(3)
    a = a.requires_grad_(True)
    cfg = LossConfig(kind="mate", teacher_support="deeper")
    multi_exit_loss(cfg, logits, features, labels, a).total.backward()
    assert not a.grad.tril(diagonal=-1).any()  # a_jk for k < j gets no gradient
    assert a.grad.triu().abs().sum() > 0


KINDS = ["dsn", "byot", "eed", "phuong_lampert", "mate"]
ALL_MODIFIERS = {
    "dtd": DTDConfig(weighting="flsw"),
    "teacher_adjust": "ps",
    "correlation_weight": 0.1,
}


@pytest.mark.parametrize("kind", KINDS)
def test_multi_exit_loss_single_exit_is_finite(kind):
    logits, features, labels, a, _ = _random_inputs(1)
    cfg = LossConfig(kind=kind, primary_weight=0.3, **ALL_MODIFIERS)
    out = multi_exit_loss(cfg, logits, features, labels, a)
    assert torch.isfinite(out.total)


@pytest.mark.parametrize("kind", KINDS)
def test_multi_exit_loss_finite_under_bf16_autocast(kind):
    logits, features, labels, a, projections = _random_inputs(3, b=16, c=10)
    logits = (10 * logits).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multi_exit_loss(
            LossConfig(kind=kind, **ALL_MODIFIERS),
            logits,
            features.bfloat16(),
            labels,
            a,
            projections=projections.bfloat16(),
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
        w = [x / max(w) for x in w]  # scaled to (0, 1] by the batch's largest
        expected = [4.0 + 2.0 * (_mean(w) - w[i]) for i in range(2)]
        assert tau[0, k].tolist() == pytest.approx(expected, rel=1e-6)


def _init_logits(num_classes: int) -> torch.Tensor:
    """Logits [K, 128, C] of a freshly initialised multi-exit ResNet-18 on a CIFAR-shaped batch
    (training mode: batch statistics, as during the first steps)."""
    torch.manual_seed(num_classes)
    cfg = ModelConfig(arch="resnet18")
    model = create_model(cfg, num_classes=num_classes, in_channels=3, image_size=32)
    with torch.no_grad():
        return model(torch.randn(128, 3, 32, 32)).logits


def _confident_logits(num_classes: int) -> torch.Tensor:
    """Logits [2, 512, C] shaped like a trained network's: batch 0 with max-probabilities spread
    evenly from chance to 0.999, batch 1 with 90% near-certain (0.999) and 10% near-chance
    samples, the heavy tail that drove the unscaled cwsm weights (1 to C) below the clamp."""
    g = torch.Generator().manual_seed(num_classes)
    chance = 1.0 / num_classes
    spread = chance + (0.999 - chance) * torch.rand(512, generator=g)
    tail = torch.where(torch.rand(512, generator=g) < 0.1, 2 * chance, 0.999)
    batches = []
    for p_max in (spread, tail):
        # One class at logit log(p (C-1) / (1-p)), the rest at 0: its softmax is exactly p.
        logits = torch.zeros(512, num_classes)
        logits[:, 0] = torch.log(p_max * (num_classes - 1) / (1 - p_max))
        batches.append(logits + 0.1 * torch.randn(512, num_classes, generator=g))
    return torch.stack(batches)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("stage", ["init", "trained"])
def test_dynamic_temperature_default_stays_in_range_for_10_and_100_classes(num_classes, stage):
    dtd = DTDConfig()  # the defaults, t0 = 4
    logits = _init_logits(num_classes) if stage == "init" else _confident_logits(num_classes)
    for student in logits:
        tau = dynamic_temperature(dtd, student[None], student[None])[0, 0]  # [B]
        assert (tau > 0.1).float().mean() >= 0.99  # above the clamp
        within = (tau >= dtd.t0 / 4) & (tau <= 4 * dtd.t0)
        assert within.float().mean() >= 0.95


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


def test_correlation_loss_zero_when_projections_equal_final_features():
    f = torch.randn(8, 5)
    assert correlation_loss(f.expand(3, -1, -1), f).item() == pytest.approx(0.0, abs=1e-6)


def test_correlation_loss_positive_when_features_differ():
    f = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(1))
    assert correlation_loss(f[:-1], f[-1]).item() > 1e-3


def test_teachers_are_softmax_weighted_sums_of_exits():
    logits = torch.tensor([Z1, Z2])
    a = [[0.0, 1.0], [2.0, -1.0]]
    t = mix_exits(teacher_weights(torch.tensor(a)), logits)
    for j in range(2):
        w = _softmax(a[j])
        for i in range(2):
            assert t[j, i].tolist() == pytest.approx(_mix(w, [Z1[i], Z2[i]]), rel=1e-6)
    # deeper support: teacher 2 may only use exit 2, so it is exit 2 exactly.
    deeper = mix_exits(teacher_weights(torch.tensor(a), "deeper"), logits)
    torch.testing.assert_close(deeper[0], t[0])
    torch.testing.assert_close(deeper[1], logits[1])


def test_teacher_weights_deeper_support_renormalises_over_exits_j_to_k():
    a = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [5.0, 5.0, 0.0]])
    w = teacher_weights(a, "deeper")
    assert w[0].tolist() == pytest.approx(_softmax([0.0, 1.0, 2.0]), rel=1e-6)
    assert w[1].tolist() == pytest.approx([0.0, 0.5, 0.5], rel=1e-6)
    assert w[2].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="teacher_support is 'shallower'"):
        teacher_weights(a, "shallower")


def test_annealed_temperature_grows_only_while_the_final_exit_is_confident():
    confident = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])  # max softmax at T=2: 0.69
    t = torch.tensor(2.0)
    assert annealed_temperature(t, confident, 1.05, 0.5).item() == pytest.approx(2.1)
    assert annealed_temperature(t, confident, 1.05, 0.7).item() == 2.0  # 0.69 is not > 0.7
    assert max(_softmax([3.0, 0.0, 0.0], 2.0)) == pytest.approx(0.6914, abs=1e-4)


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


# ---------------------------------------------------------------------------------------------
# MATE's weight network and ramp-up against the code they are grounded in
# ---------------------------------------------------------------------------------------------


# DefangChen/OKDDip, models/model_cifar/resnet_GL.py @ c6a05de892fc7d2b6767668548786688a388c2d6
def test_teacher_attention_matches_okddip_group_targets():
    num_exits, batch, dim, classes = 4, 6, 64, 10
    network = TeacherAttention(dim)
    assert network.query.weight.shape == (dim // 8, dim) and network.query.bias is None
    assert network.key.weight.shape == (dim // 8, dim) and network.key.bias is None
    g = torch.Generator().manual_seed(0)
    features = torch.randn(num_exits, batch, dim, generator=g)
    logits = 3.0 * torch.randn(num_exits, batch, classes, generator=g)
    query, key = (0.3 * torch.randn(dim // 8, dim, generator=g) for _ in range(2))
    # Upstream gradients on both outputs, so every input's gradient is exercised.
    up_weights = torch.randn(batch, num_exits, num_exits, generator=g)
    up_teachers = torch.randn(num_exits, batch, classes, generator=g)

    def ours(f, z, wq, wk):
        params = {"query.weight": wq, "key.weight": wk}
        scores = torch.func.functional_call(network, params, (f,))  # [B, J, K]
        weights = teacher_weights(scores)
        return weights, mix_exits(weights, z)  # [B, J, K], [J, B, C]

    def okddip(f, z, wq, wk):
        attention, x_m = okddip_group_targets(list(f), list(z), wq, wk)
        return attention, x_m.permute(2, 0, 1)  # x_m [B, C, N] -> [J, B, C]

    results = []
    for fn in (ours, okddip):
        leaves = [x.clone().requires_grad_(True) for x in (features, logits, query, key)]
        weights, teachers = fn(*leaves)
        ((weights * up_weights).sum() + (teachers * up_teachers).sum()).backward()
        results.append((weights.detach(), teachers.detach(), [x.grad for x in leaves]))
    (w, t, grads), (ref_w, ref_t, ref_grads) = results
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t, ref_t, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w[0], w[1])  # per-sample weights, not one vector for the batch
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        atol = 1e-5 * ref_grad.abs().max().item()
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=atol)


# Lan1991Xu/ONE_NeurIPS2018 utils/ramps.py @ 54afde30fe039c8bd66668f0d17944b451b8b189 and
# DefangChen/OKDDip train_GL.py @ c6a05de892fc7d2b6767668548786688a388c2d6: length 80 of 300.
@pytest.mark.parametrize(
    ("epochs", "fraction"), [(300, DEFAULT_KD_RAMPUP), (8, 0.3), (200, 0.5), (10, 0.0)]
)
def test_rampup_matches_one_and_okddip(epochs, fraction):
    for epoch in range(epochs):
        expected = consistency_rampup(epoch, fraction * epochs)
        assert rampup(epoch, epochs, fraction) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if fraction:
        assert rampup(0, epochs, fraction) == pytest.approx(math.exp(-5.0))
    assert rampup(epochs - 1, epochs, fraction) == 1.0


def test_default_rampup_covers_the_reference_80_of_300_epochs():
    for epoch in (0, 1, 40, 79, 80, 150):
        expected = consistency_rampup(epoch, 80)
        assert rampup(epoch, 300, DEFAULT_KD_RAMPUP) == pytest.approx(expected, rel=1e-12)
