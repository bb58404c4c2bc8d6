"""Multi-exit self-distillation losses (DESIGN §3): pure functions, tensors in, scalars out.

K exits give logits z_1..z_K ([K, B, C], shallowest first) and pooled features f_1..f_K
([K, B, D]). CE is cross entropy with the label, KL_T(p||z) = T^2 KL(p || softmax(z/T)).
Every loss is a sum over exits of means over the batch, computed in float32.

- dsn    sum_k CE(z_k)
- byot   (1-a) sum_k CE(z_k) + a T^2 sum_{k<K} softCE(z_k/T, z_K/T)
         + b sum_{k<K} ||f_k - f_K||^2 (only where f_k > 0 or f_K > 0)
         https://arxiv.org/abs/1905.08094 (teacher z_K, f_K detached as in the authors' code)
- eed    sum_k CE(z_k) + c sum_k KL_T(mean_k z_k || z_k), teacher detached
         https://arxiv.org/abs/2103.15498
- phuong_lampert  (1-C) sum_k CE(z_k) + C sum_{k<K} KL_T(z_K || z_k), teacher detached
         https://openaccess.thecvf.com/content_ICCV_2019/html/Phuong_Distillation-Based_Training_for_Multi-Exit_Architectures_ICCV_2019_paper.html
- mate   (1-lambda) sum_k CE(z_k) + sum_j CE(t_j)
         + lambda sum_k [mu KL_T(t_k||z_k) + (1-mu)/(K-1) sum_{j!=k} KL_T(t_j||z_k)]
         with ensemble teachers t_j = sum_k softmax(a_j)_k z_k, detached inside the KL terms.
         MATE (Sun et al., FITEE 2024) is reconstructed from the paper's abstract only.

Modifiers for the distilling kinds (ignored by dsn, which has no teacher):
dynamic temperature (dtd) and teacher knowledge adjustment (lsr / ps), both from "Preparing
Lessons" (Wen et al., https://arxiv.org/abs/1911.07471), and a DLKD-style batch correlation
term (Ding et al. 2022). All teacher-student pairs are evaluated as one [J, K, B, C] tensor op.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from trainer.config import DTDConfig, LossConfig

__all__ = [
    "LossOutput",
    "correlation_loss",
    "dynamic_temperature",
    "ensemble_teachers",
    "init_teacher_logits",
    "multi_exit_loss",
    "soft_targets",
]

# init_teacher_logits: log-weight of an exit a teacher starts (almost) without. Each such exit
# gets 1/100 of the weight of a favoured exit: small, but finite so it stays trainable.
_OFF_LOGIT = math.log(1e-2)
_LSR_EPS = 0.1  # label smoothing of the lsr knowledge adjustment
_CORRELATION_T = 0.5  # temperature of the DLKD similarity distributions
_DTD_MIN_T = 0.1  # dtd temperatures are clamped to at least this


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


def ensemble_teachers(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Teacher logits t_j = sum_k softmax(a_j)_k z_k: [K, B, C] x [J, K] -> [J, B, C]."""
    weights = teacher_logits.softmax(dim=-1)  # [J, K]
    return torch.einsum("jk,kbc->jbc", weights, logits)


# ---------------------------------------------------------------------------------------------
# Modifiers: dynamic temperature, knowledge adjustment, correlation
# ---------------------------------------------------------------------------------------------


def dynamic_temperature(
    dtd: DTDConfig, student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """Per-sample temperatures tau_i = t0 + beta (mean_b w_b - w_i), clamped to >= 0.1.

    student_logits [K, B, C], teacher_logits [J, B, C] -> tau [J, K, B] (pair j->k, sample i),
    computed without gradient: the temperature is a per-batch schedule, not a learned quantity.
    Weights: cwsm w_i = 1 / (max softmax(z_s,i) + 1e-3) (the student's confidence at T=1);
    flsw w_i = (1 - cos(z_s,i, z_t,i))^gamma, the cosine taken between the logit vectors and
    1 - cos clamped at 0 against rounding.
    """
    with torch.no_grad():
        zs = student_logits.detach().float()[None]  # [1, K, B, C]
        zt = teacher_logits.detach().float()[:, None]  # [J, 1, B, C]
        if dtd.weighting == "cwsm":
            w = 1.0 / (zs.softmax(dim=-1).amax(dim=-1) + 1e-3)  # [1, K, B]
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


def correlation_loss(features: torch.Tensor) -> torch.Tensor:
    """DLKD-style term sum_{k<K} mean_i KL(softmax(S_K,i / 0.5) || softmax(S_k,i / 0.5)).

    features [K, B, D] -> []. S_k = cosine similarities [B, B] of the batch's features at exit
    k, S_K those of the final exit (detached). All exits share D, so no projection is needed;
    the diagonal (self-similarity 1) is kept in both distributions.
    """
    student = F.normalize(features[:-1], dim=-1)  # [K-1, B, D]
    final = F.normalize(features[-1:].detach(), dim=-1)  # [1, B, D]
    log_q = F.log_softmax(student @ student.transpose(1, 2) / _CORRELATION_T, dim=-1)  # [K-1, B, B]
    log_p = F.log_softmax(final @ final.transpose(1, 2) / _CORRELATION_T, dim=-1)  # [1, B, B]
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [K-1, B]
    return kl.mean(dim=-1).sum()


# ---------------------------------------------------------------------------------------------
# The batched teacher -> student term
# ---------------------------------------------------------------------------------------------


def _distill(
    teachers: torch.Tensor,
    students: torch.Tensor,
    labels: torch.Tensor,
    cfg: LossConfig,
    weights: torch.Tensor,
    *,
    soft_ce: bool = False,
) -> torch.Tensor:
    """sum_{j,k} weights[j,k] mean_i tau^2 D(p_j,i || softmax(z_k,i / tau)), one batched op.

    teachers [J, B, C] (detached), students [K, B, C], weights [J, K]; D is KL, or the soft
    cross entropy -sum p log q when `soft_ce` (byot). tau is cfg.temperature, or the per-pair,
    per-sample dtd temperature [J, K, B].
    """
    if cfg.dtd is None:
        tau = teachers.new_tensor(cfg.temperature)  # []
        log_q = F.log_softmax(students / tau, dim=-1)  # [K, B, C], shared by all teachers
    else:
        tau = dynamic_temperature(cfg.dtd, students, teachers)  # [J, K, B]
        log_q = F.log_softmax(students / tau.unsqueeze(-1), dim=-1)  # [J, K, B, C]
    log_p = soft_targets(teachers[:, None], labels, tau, cfg.teacher_adjust)  # [J, 1|K, B, C]
    p = log_p.exp()
    # A broadcast product beats einsum("jbc,kbc->jkb") here: that becomes B tiny matmuls.
    cross = -(p * log_q).sum(dim=-1)  # [J, K, B] soft CE
    neg_entropy = (p * log_p).sum(dim=-1)  # [J, 1|K, B]
    div = cross if soft_ce else cross + neg_entropy  # KL(p||q) = soft CE - H(p)
    per_pair = (tau**2 * div).mean(dim=-1)  # [J, K]
    return (weights * per_pair).sum()


def _mate_pair_weights(num_exits: int, mu: float, like: torch.Tensor) -> torch.Tensor:
    """[J, K] weights of KL_T(t_j || z_k): mu on the diagonal, (1-mu)/(K-1) elsewhere."""
    eye = torch.eye(num_exits, dtype=like.dtype, device=like.device)
    off = (1.0 - mu) / (num_exits - 1) if num_exits > 1 else 0.0  # K=1: no off-primary terms
    return mu * eye + off * (1.0 - eye)


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def multi_exit_loss(
    cfg: LossConfig,
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
) -> LossOutput:
    """The training loss of `cfg.kind` (DESIGN §3).

    logits [K, B, C] shallowest exit first, features [K, B, D], labels [B] int64,
    teacher_logits [K, K] MATE's trainable a_j (required for kind="mate", else ignored).
    Computed in float32 with autocast off, whatever the inputs' dtype.
    """
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
        raise ValueError("loss.kind is 'mate', which needs teacher_logits [K, K]")
    if cfg.kind == "mate" and teacher_logits.shape != (num_exits, num_exits):
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher_logits.shape)}, "
            f"but must be [{num_exits}, {num_exits}]"
        )

    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.float()  # [K, B, C]
        f = features.float()  # [K, B, D]
        ce = F.cross_entropy(z.flatten(0, 1), labels.repeat(num_exits), reduction="none")
        ce = ce.view(num_exits, batch).mean(dim=1)  # [K]
        kd = cfg.kd_weight
        ones = z.new_ones(1, num_exits - 1)  # [1, K-1] weights of the k<K terms

        if cfg.kind == "dsn":
            return LossOutput(ce.sum(), ce.detach())
        if cfg.kind == "byot":
            total = (1.0 - kd) * ce.sum()
            total = total + kd * _distill(z[-1:].detach(), z[:-1], labels, cfg, ones, soft_ce=True)
            diff = f[:-1] - f[-1:].detach()  # [K-1, B, D]
            mask = (f[:-1] > 0) | (f[-1:] > 0)
            hint = (diff.square() * mask).sum(dim=-1).mean(dim=-1).sum()
            total = total + cfg.feature_weight * hint
        elif cfg.kind == "eed":
            teacher = z.mean(dim=0, keepdim=True).detach()  # [1, B, C]
            total = ce.sum() + kd * _distill(teacher, z, labels, cfg, z.new_ones(1, num_exits))
        elif cfg.kind == "phuong_lampert":
            total = (1.0 - kd) * ce.sum() + kd * _distill(
                z[-1:].detach(), z[:-1], labels, cfg, ones
            )
        elif cfg.kind == "mate":
            teachers = ensemble_teachers(z, teacher_logits.float())  # [K, B, C]
            teacher_ce = F.cross_entropy(
                teachers.flatten(0, 1), labels.repeat(num_exits), reduction="none"
            )  # [K*B]
            pair_weights = _mate_pair_weights(num_exits, cfg.primary_weight, z)  # [K, K]
            kl = _distill(teachers.detach(), z, labels, cfg, pair_weights)
            total = (1.0 - kd) * ce.sum() + teacher_ce.view(num_exits, batch).mean(1).sum()
            total = total + kd * kl
        else:
            raise ValueError(f"loss.kind is {cfg.kind!r}, which this module does not know")

        if cfg.correlation_weight > 0.0:
            total = total + cfg.correlation_weight * correlation_loss(f)
        return LossOutput(total, ce.detach())
