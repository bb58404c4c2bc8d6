"""Multi-exit self-distillation losses (docs/design.md §3): pure functions, tensors in, scalars out.

K exits give logits z_1..z_K ([K, B, C], shallowest first) and pooled features f_1..f_K
([K, B, D]). CE is cross entropy with the label, softCE_T(p, z) = -sum p log softmax(z/T),
KL_T(p||z) = T^2 KL(p || softmax(z/T)). Losses are sums over exits of means over the batch,
computed in float32. Each baseline computes what its authors' code computes (the parity
tests in tests/test_losses.py name the repository, file and commit):

- dsn    sum_k CE(z_k)
- byot   (1-a) sum_k CE(z_k) + a T^2 sum_{k<K} softCE_T(z_K, z_k)
         + b sum_{k<K} sum_{batch,dims} (f_k - f_K)^2 (where f_k > 0 or f_K > 0)
         teacher z_K, f_K detached. https://arxiv.org/abs/1905.08094
- eed    sum_k CE(z_k) + c sum_k mean_{batch,classes} (z_k - zbar)^2       (eed_output: mse)
                       or c T^2 sum_k softCE_T(zbar, z_k)                    (eed_output: kl)
         + e sum_k mean_{batch,dims} (f_k - fbar)^2 (where f_k > 0 or fbar > 0)
         zbar, fbar the detached means over all exits. https://arxiv.org/abs/2104.00299
- phuong_lampert  (10/K) [(1-C) sum_k CE(z_k) + C T^2 sum_{k<K} softCE_T(z_K, z_k)],
         z_K detached; T is training state the engine anneals (`annealed_temperature`).
         https://openaccess.thecvf.com/content_ICCV_2019/html/Phuong_Distillation-Based_Training_for_Multi-Exit_Architectures_ICCV_2019_paper.html
- mate   w_ce sum_k CE(z_k) [+ sum_j CE(t_j)]
         + lambda r(e) sum_k [mu KL_T(t_k||z_k) + (1-mu)/(K-1) sum_{j!=k} KL_T(t_j||z_k)]
         with ensemble teachers t_j = sum_k w_jk z_k, w_j = softmax over the exits of teacher
         j's scores: per sample from the attention weight network (q_j . k_k of the exits'
         pooled features) or a static trainable vector a_j. Knobs (docs/mate.md): w_ce 1 or
         1 - lambda; the teacher CE absent, on the weights only or reaching the exits; the KL
         targets detached or not; r(e) the ramp-up exp(-5 (1 - e/R)^2). MATE (Sun et al.,
         FITEE 2024) is built from its overview figure and its authors' group's code (OKDDip).

Modifiers for the kinds with soft targets (dsn has no teacher, eed's mse output no soft
targets): dynamic temperature (dtd) and teacher knowledge adjustment (lsr / ps), both from
"Preparing Lessons" (Wen et al., https://arxiv.org/abs/1911.07471), and, for every kind
but dsn, a DLKD-style batch correlation term on projected exit features (Ding et al. 2022).
All teacher-student pairs are evaluated as one [J, K, B, C] tensor op.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from trainer.config import DTDConfig, LossConfig

__all__ = [
    "LossOutput",
    "annealed_temperature",
    "correlation_loss",
    "dynamic_temperature",
    "init_teacher_logits",
    "mix_exits",
    "multi_exit_loss",
    "rampup",
    "soft_targets",
    "teacher_weights",
]

# init_teacher_logits: log-weight of an exit a teacher starts (almost) without. Each such exit
# gets 1/100 of the weight of a favoured exit: small, but finite so it stays trainable.
_OFF_LOGIT = math.log(1e-2)
_LSR_EPS = 0.1  # label smoothing of the lsr knowledge adjustment
_CORRELATION_T = 0.5  # temperature of the DLKD similarity distributions (CorrLoss default)
_DTD_MIN_T = 0.1  # dtd temperatures are clamped to at least this
# phuong_lampert scales its loss by 2 * 5 / K (train_cifar.py: global_scale for 11 exits).
_PL_SCALE = 2.0 * 5.0


class LossOutput(NamedTuple):
    total: torch.Tensor  # [] what backward() is called on
    per_exit_ce: torch.Tensor  # [K] CE of each exit vs the label, detached, for logging


# ---------------------------------------------------------------------------------------------
# MATE's ensemble teachers
# ---------------------------------------------------------------------------------------------


def init_teacher_logits(num_exits: int, teacher_init: str) -> torch.Tensor:
    """Initial teacher weight logits a_j, [K, K] float32 (row j = teacher j, softmax over exits).

    - ``uniform``: zeros, every teacher averages all exits.
    - ``deeper``: 0 for exits k >= j, log(1/100) for shallower ones, so teacher j is (almost)
      uniform over exits j..K; the last teacher is (almost) the final exit.
    - ``next``: 0 for exit j+1 (exit K for the last teacher), log(1/100) elsewhere.

    Excluded exits keep a finite logit (1/100 of a favoured exit's weight), so training can
    still move weight onto them; -inf would freeze them out for good.
    """
    if num_exits < 1:
        raise ValueError(f"num_exits is {num_exits}, but must be >= 1")
    k = torch.arange(num_exits)
    j = k[:, None]  # [K, 1] teacher index, 0-based
    if teacher_init == "uniform":
        keep = torch.ones(num_exits, num_exits, dtype=torch.bool)
    elif teacher_init == "deeper":
        keep = k[None, :] >= j
    elif teacher_init == "next":
        keep = k[None, :] == (j + 1).clamp(max=num_exits - 1)
    else:
        raise ValueError(
            f"teacher_init is {teacher_init!r}, but must be one of 'deeper', 'uniform', 'next'"
        )
    zero = torch.zeros(num_exits, num_exits, dtype=torch.float32)
    return torch.where(keep, zero, torch.full_like(zero, _OFF_LOGIT))


def teacher_weights(teacher_logits: torch.Tensor, support: str = "all") -> torch.Tensor:
    """Each teacher's weights over the exits: scores [..., J, K] -> rows summing to 1.

    The scores are static logits a_j ([J, K]) or the weight network's per-sample q_j . k_k
    ([B, J, K]). ``all``: softmax over every exit. ``deeper``: softmax over exits j..K only
    (the shallower exits get weight 0 and no gradient), so exit k's primary teacher t_k never
    leans on exits shallower than k.
    """
    if support == "all":
        return teacher_logits.softmax(dim=-1)
    if support == "deeper":
        num_teachers, num_exits = teacher_logits.shape[-2:]
        k = torch.arange(num_exits, device=teacher_logits.device)
        j = torch.arange(num_teachers, device=teacher_logits.device)[:, None]
        return teacher_logits.masked_fill(k < j, float("-inf")).softmax(dim=-1)
    raise ValueError(f"teacher_support is {support!r}, but must be one of 'all', 'deeper'")


def mix_exits(weights: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """t_j = sum_k w_jk z_k: weights [J, K] (shared) or [B, J, K] (per sample) x logits
    [K, B, C] -> [J, B, C]."""
    if weights.dim() == 2:
        return torch.einsum("jk,kbc->jbc", weights, logits)
    return torch.einsum("bjk,kbc->jbc", weights, logits)


def rampup(epoch: int, epochs: int, fraction: float) -> float:
    """The distillation weight's ramp-up factor during `epoch` (0-based) of `epochs`:
    exp(-5 (1 - min(e, R) / R)^2) with R = fraction * epochs, 1 when fraction is 0.

    ONE's ``sigmoid_rampup`` and OKDDip's ``get_current_consistency_weight`` (Laine & Aila's
    schedule, https://arxiv.org/abs/1610.02242), with the length a fraction of the run.
    """
    length = fraction * epochs
    if length <= 0.0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0), length) / length
    return math.exp(-5.0 * phase * phase)


# ---------------------------------------------------------------------------------------------
# Phuong-Lampert's temperature annealing (the engine owns the state)
# ---------------------------------------------------------------------------------------------


def annealed_temperature(
    temperature: torch.Tensor, final_logits: torch.Tensor, factor: float, max_prob: float
) -> torch.Tensor:
    """The temperature for the next step: T * factor if the final exit's mean max-probability
    at T, mean_i max softmax(z_K,i / T), exceeds `max_prob`, else T.

    temperature [] float32, final_logits [B, C] of the step just taken. Stays on the device
    (no host sync), carries no gradient.
    """
    with torch.no_grad():
        confidence = (final_logits.float() / temperature).softmax(dim=-1).amax(dim=-1).mean()
        return torch.where(confidence > max_prob, temperature * factor, temperature)


# ---------------------------------------------------------------------------------------------
# Modifiers: dynamic temperature, knowledge adjustment, correlation
# ---------------------------------------------------------------------------------------------


def dynamic_temperature(
    dtd: DTDConfig, student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """Per-sample temperatures tau_i = t0 + beta (mean_b w_b - w_i), clamped to >= 0.1.

    student_logits [K, B, C], teacher_logits [J, B, C] -> tau [J, K, B] (pair j->k, sample i),
    computed without gradient: the temperature is a per-batch schedule, not a learned quantity.
    Weights: cwsm w_i = 1 / (max softmax(z_s,i) + 1e-3) (the student's confidence at T=1),
    divided by the batch's largest so w lies in (0, 1] whatever the number of classes (raw,
    it spans 1..C); flsw w_i = (1 - cos(z_s,i, z_t,i))^gamma, the cosine taken between the
    logit vectors and 1 - cos clamped at 0 against rounding.
    """
    with torch.no_grad():
        zs = student_logits.detach().float()[None]  # [1, K, B, C]
        zt = teacher_logits.detach().float()[:, None]  # [J, 1, B, C]
        if dtd.weighting == "cwsm":
            w = 1.0 / (zs.softmax(dim=-1).amax(dim=-1) + 1e-3)  # [1, K, B]
            w = w / w.amax(dim=-1, keepdim=True)
        else:  # flsw
            cos = F.cosine_similarity(zs, zt, dim=-1)  # [J, K, B]
            w = (1.0 - cos).clamp(min=0.0) ** dtd.gamma
        tau = dtd.t0 + dtd.beta * (w.mean(dim=-1, keepdim=True) - w)
        tau = tau.clamp(min=_DTD_MIN_T)
        return tau.expand(teacher_logits.shape[0], student_logits.shape[0], -1)  # [J, K, B]


def soft_targets(
    teacher_logits: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor, adjust: str = "none"
) -> torch.Tensor:
    """Log soft targets log softmax(t / tau), knowledge-adjusted where the teacher is wrong.

    teacher_logits [..., B, C], labels [B], tau [] or broadcastable to [..., B];
    returns log-probabilities [broadcast(...), B, C]. Where argmax(t) != label:
    - ``lsr``: the target becomes (1 - eps) onehot(label) + eps / C, eps = 0.1 (the label gets
      1 - eps + eps/C, every other class eps/C; independent of the temperature);
    - ``ps``: the probabilities of the teacher's argmax class and of the label are swapped.
    Where the teacher is right both leave the target unchanged.
    """
    t = tau.unsqueeze(-1) if tau.dim() else tau  # [..., B, 1] or []
    log_p = F.log_softmax(teacher_logits / t, dim=-1)  # [..., B, C]
    if adjust == "none":
        return log_p
    num_classes = teacher_logits.shape[-1]
    argmax = teacher_logits.argmax(dim=-1)  # [..., B]
    label = labels.expand_as(argmax)  # [..., B]
    if adjust == "lsr":
        onehot = F.one_hot(label, num_classes).to(log_p)  # [..., B, C]
        smooth = (1.0 - _LSR_EPS) * onehot + _LSR_EPS / num_classes
        wrong = (argmax != label).unsqueeze(-1)  # [..., B, 1]
        return torch.where(wrong, smooth.log(), log_p)
    if adjust == "ps":
        # Swapping two classes is a permutation of the class axis: index[c] says where class
        # c's new probability comes from. When argmax == label it is the identity.
        index = torch.arange(num_classes, device=log_p.device).expand(*argmax.shape, -1)
        index = index.scatter(-1, argmax.unsqueeze(-1), label.unsqueeze(-1))
        index = index.scatter(-1, label.unsqueeze(-1), argmax.unsqueeze(-1))  # [..., B, C]
        return log_p.gather(-1, index.expand_as(log_p))
    raise ValueError(f"teacher_adjust is {adjust!r}, but must be one of 'none', 'lsr', 'ps'")


def correlation_loss(projections: torch.Tensor, final_features: torch.Tensor) -> torch.Tensor:
    """DLKD-style term sum_{k<K} mean_i KL(softmax(S_K,i / 0.5) || softmax(S_k,i / 0.5)).

    projections [K-1, B, P]: exits 1..K-1's features after their projection heads;
    final_features [B, D]: the final exit's (detached here) -> []. S_k = cosine similarities
    [B, B] within the batch; the diagonal (self-similarity 1) is kept in both distributions.
    """
    student = F.normalize(projections, dim=-1)  # [K-1, B, P]
    final = F.normalize(final_features.detach(), dim=-1)  # [B, D]
    log_q = F.log_softmax(student @ student.transpose(1, 2) / _CORRELATION_T, dim=-1)  # [K-1,B,B]
    log_p = F.log_softmax(final @ final.T / _CORRELATION_T, dim=-1)  # [B, B]
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [K-1, B]
    return kl.mean(dim=-1).sum()


def _masked_square_error(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(f - target)^2 where f > 0 or target > 0 (post-ReLU units that are off in both carry
    no hint), as in BYOT's and EED's feature losses: [K', B, D] x [1, B, D] -> [K', B, D]."""
    return (features - target).square() * ((features > 0) | (target > 0))


# ---------------------------------------------------------------------------------------------
# The batched teacher -> student term
# ---------------------------------------------------------------------------------------------


def _distill(
    teachers: torch.Tensor,
    students: torch.Tensor,
    labels: torch.Tensor,
    cfg: LossConfig,
    weights: torch.Tensor,
    temperature: torch.Tensor,
    *,
    soft_ce: bool = False,
) -> torch.Tensor:
    """sum_{j,k} weights[j,k] T^2 mean_i D(p_j,i || softmax(z_k,i / tau_i)), one batched op.

    teachers [J, B, C] (detached where the kind's code detaches them), students [K, B, C],
    weights [J, K], temperature []; D is
    KL, or the soft cross entropy -sum p log q when `soft_ce` (byot, eed, phuong_lampert, as
    their code computes it). With dtd, tau_i is the per-pair, per-sample temperature [J, K, B]
    and T = t0: each sample's term is not scaled by its own tau_i^2 (TextBrewer's form; a
    factor tau_i^2 would shrink the gradients of the hard, low-temperature samples dtd means
    to emphasise), and t0^2 keeps the term on the scale the kinds' weights assume.
    """
    if cfg.dtd is None:
        tau = scale = temperature  # []
        log_q = F.log_softmax(students / tau, dim=-1)  # [K, B, C], shared by all teachers
    else:
        tau = dynamic_temperature(cfg.dtd, students, teachers)  # [J, K, B]
        scale = teachers.new_tensor(cfg.dtd.t0)
        log_q = F.log_softmax(students / tau.unsqueeze(-1), dim=-1)  # [J, K, B, C]
    log_p = soft_targets(teachers[:, None], labels, tau, cfg.teacher_adjust)  # [J, 1|K, B, C]
    p = log_p.exp()
    # A broadcast product beats einsum("jbc,kbc->jkb") here: that becomes B tiny matmuls.
    cross = -(p * log_q).sum(dim=-1)  # [J, K, B] soft CE
    div = cross if soft_ce else cross + (p * log_p).sum(dim=-1)  # KL(p||q) = soft CE - H(p)
    return scale**2 * (weights * div.mean(dim=-1)).sum()


def _mate_pair_weights(num_exits: int, mu: float, like: torch.Tensor) -> torch.Tensor:
    """[J, K] weights of KL_T(t_j || z_k): mu on the diagonal, (1-mu)/(K-1) elsewhere."""
    eye = torch.eye(num_exits, dtype=like.dtype, device=like.device)
    off = (1.0 - mu) / (num_exits - 1) if num_exits > 1 else 0.0  # K=1: no off-primary terms
    return mu * eye + off * (1.0 - eye)


def _mate_loss(
    cfg: LossConfig,
    z: torch.Tensor,
    labels: torch.Tensor,
    ce: torch.Tensor,
    scores: torch.Tensor,
    temperature: torch.Tensor,
    kd_rampup: float,
) -> torch.Tensor:
    """MATE's total without the correlation term: z [K, B, C], ce [K] the exits' CE, scores
    [K, K] or [B, K, K] the teachers' weight logits."""
    weights = teacher_weights(scores, cfg.teacher_support)  # [J, K] or [B, J, K]
    teachers = mix_exits(weights, z)  # [J, B, C]
    kd = cfg.kd_weight
    total = (1.0 if cfg.exit_ce_weight == "one" else 1.0 - kd) * ce.sum()
    if cfg.teacher_ce != "none":
        # "weights": the CE trains the weights only, the exits' logits are constants in it.
        mixed = teachers if cfg.teacher_ce == "exits" else mix_exits(weights, z.detach())
        num_teachers = mixed.shape[0]
        teacher_ce = F.cross_entropy(mixed.flatten(0, 1), labels.repeat(num_teachers))
        total = total + num_teachers * teacher_ce  # the sum over teachers of batch means
    targets = teachers.detach() if cfg.detach_targets else teachers
    pair_weights = _mate_pair_weights(z.shape[0], cfg.primary_weight, z)  # [J, K]
    return total + kd * kd_rampup * _distill(targets, z, labels, cfg, pair_weights, temperature)


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def _check_shapes(
    cfg: LossConfig,
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    projections: torch.Tensor | None,
) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits has shape {tuple(logits.shape)}, but must be [K, B, C]")
    num_exits, batch = logits.shape[:2]
    if features.dim() != 3 or features.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"features has shape {tuple(features.shape)}, but must be [K, B, D] "
            f"with K, B = {num_exits}, {batch} as in logits"
        )
    if labels.shape != (batch,):
        raise ValueError(f"labels has shape {tuple(labels.shape)}, but must be [{batch}]")
    if cfg.kind == "mate" and teacher_logits is None:
        raise ValueError("loss.kind is 'mate', which needs teacher_logits [K, K] or [B, K, K]")
    if cfg.kind == "mate" and teacher_logits.shape not in (
        (num_exits, num_exits),
        (batch, num_exits, num_exits),
    ):
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher_logits.shape)}, "
            f"but must be [{num_exits}, {num_exits}] or [{batch}, {num_exits}, {num_exits}]"
        )
    if _uses_correlation(cfg, num_exits) and (
        projections is None
        or projections.dim() != 3
        or projections.shape[:2] != (num_exits - 1, batch)
    ):
        got = None if projections is None else tuple(projections.shape)
        raise ValueError(
            f"loss.correlation_weight is {cfg.correlation_weight}, which needs projections "
            f"[{num_exits - 1}, {batch}, P] from the model's projection heads, got {got}"
        )


def _uses_correlation(cfg: LossConfig, num_exits: int) -> bool:
    return cfg.uses_correlation and num_exits > 1  # one exit has no student to project


def multi_exit_loss(
    cfg: LossConfig,
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    temperature: torch.Tensor | float | None = None,
    projections: torch.Tensor | None = None,
    kd_rampup: float = 1.0,
) -> LossOutput:
    """The training loss of `cfg.kind` (docs/design.md §3).

    logits [K, B, C] shallowest exit first, features [K, B, D], labels [B] int64,
    teacher_logits MATE's teacher scores (required for kind="mate", else ignored): the static
    a_j [K, K] or the weight network's per-sample scores [B, K, K],
    temperature the current T (phuong_lampert's annealed state; None: cfg.temperature),
    kd_rampup MATE's ramp-up factor of the distillation weight this epoch (:func:`rampup`),
    projections [K-1, B, P] exits 1..K-1's projected features (required when the
    correlation term is on). Computed in float32 with autocast off, whatever the inputs' dtype.
    """
    _check_shapes(cfg, logits, features, labels, teacher_logits, projections)
    num_exits, batch = logits.shape[:2]
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.float()  # [K, B, C]
        f = features.float()  # [K, B, D]
        if isinstance(temperature, torch.Tensor):
            t = temperature.detach().float()  # []
        else:
            t = z.new_tensor(cfg.temperature if temperature is None else temperature)
        ce = F.cross_entropy(z.flatten(0, 1), labels.repeat(num_exits), reduction="none")
        ce = ce.view(num_exits, batch).mean(dim=1)  # [K]
        kd = cfg.kd_weight
        ones = z.new_ones(1, num_exits - 1)  # [1, K-1] weights of the k<K terms

        if cfg.kind == "dsn":
            return LossOutput(ce.sum(), ce.detach())
        if cfg.kind == "byot":
            total = (1.0 - kd) * ce.sum()
            total = total + kd * _distill(
                z[-1:].detach(), z[:-1], labels, cfg, ones, t, soft_ce=True
            )
            hint = _masked_square_error(f[:-1], f[-1:].detach()).sum()
            total = total + cfg.feature_weight * hint
        elif cfg.kind == "eed":
            teacher = z.mean(dim=0, keepdim=True).detach()  # [1, B, C]
            if cfg.eed_output == "mse":
                output = (z - teacher).square().mean(dim=(1, 2)).sum()
            else:
                all_exits = z.new_ones(1, num_exits)
                output = _distill(teacher, z, labels, cfg, all_exits, t, soft_ce=True)
            feature_teacher = f.mean(dim=0, keepdim=True).detach()  # [1, B, D]
            hint = _masked_square_error(f, feature_teacher).mean(dim=(1, 2)).sum()
            total = ce.sum() + kd * output + cfg.feature_weight * hint
        elif cfg.kind == "phuong_lampert":
            kl = _distill(z[-1:].detach(), z[:-1], labels, cfg, ones, t, soft_ce=True)
            total = _PL_SCALE / num_exits * ((1.0 - kd) * ce.sum() + kd * kl)
        elif cfg.kind == "mate":
            total = _mate_loss(cfg, z, labels, ce, teacher_logits.float(), t, kd_rampup)
        else:
            raise ValueError(f"loss.kind is {cfg.kind!r}, which this module does not know")

        if _uses_correlation(cfg, num_exits):
            total = total + cfg.correlation_weight * correlation_loss(projections.float(), f[-1])
        return LossOutput(total, ce.detach())
