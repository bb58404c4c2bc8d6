"""Reference computations, written independently of trainer/losses.py.

Each baseline is transcribed in our own words from its authors' code (the repository, file
and commit are named next to each function and next to the parity tests in
tests/test_losses.py), one exit and one exit pair at a time, with the reductions those
scripts use. `naive_mate_loss` is MATE written from docs/design.md §3 as loops over exit pairs; the
tests check the batched implementation against it and bench/bench_loss.py times the two.
`okddip_group_targets` and `consistency_rampup` transcribe the code MATE's weight network
and ramp-up are grounded in (OKDDip, ONE).
Not part of the library.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.config import DTDConfig, LossConfig

__all__ = [
    "PhuongLampertReference",
    "byot_reference",
    "consistency_rampup",
    "dlkd_correlation_reference",
    "eed_reference",
    "naive_mate_loss",
    "okddip_group_targets",
    "textbrewer_temperature",
]


def _soft_ce(student: torch.Tensor, target_probs: torch.Tensor, t: float) -> torch.Tensor:
    """-mean_i sum_c p_ic log softmax(s_i / t)_c: the kd_loss_function of BYOT and EED and the
    dist_loss of Phuong-Lampert (all three feed it probabilities already softened by t)."""
    return -(target_probs * torch.log_softmax(student / t, dim=1)).sum(dim=1).mean()


def _masked_square(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(f - target)^2 kept only where f > 0 or target > 0 (BYOT's and EED's feature loss)."""
    return (f - target) ** 2 * ((f > 0) | (target > 0)).float()


# luanyunteng/pytorch-be-your-own-teacher, train.py @ 8f052ad836bafae6426a68a5617ae39b2aa73b78
def byot_reference(
    logits: list[torch.Tensor],
    features: list[torch.Tensor],
    labels: torch.Tensor,
    *,
    temperature: float = 3.0,
    alpha: float = 0.1,
    beta: float = 1e-6,
) -> torch.Tensor:
    """(1-alpha) sum of every exit's CE + alpha T^2 soft CE of each shallower exit against the
    deepest one's softened, detached probabilities + beta times the masked squared feature
    distance to the deepest exit's detached features, summed over batch and dimensions."""
    final_probs = torch.softmax(logits[-1] / temperature, dim=1).detach()
    final_features = features[-1].detach()
    ce = sum(F.cross_entropy(z, labels) for z in logits)
    kd = sum(_soft_ce(z, final_probs, temperature) * temperature**2 for z in logits[:-1])
    hint = sum(_masked_square(f, final_features).abs().sum() for f in features[:-1])
    return (1 - alpha) * ce + alpha * kd + beta * hint


# hjdw2/Exit-Ensemble-Distillation, train.py @ 146c9cf0e234ccdba3fa7573ca33822389f83bd7
def eed_reference(
    logits: list[torch.Tensor],
    features: list[torch.Tensor],
    labels: torch.Tensor,
    *,
    output: str = "MSE",
    temperature: float = 3.0,
) -> torch.Tensor:
    """Every exit's CE, plus every exit (the final one too) distilled from the detached mean
    of all exits' logits: MSE averaged over batch and classes, or 0.1 T^2 soft CE for the KL
    variant; plus every exit's masked squared distance to the detached mean of all exits'
    features, averaged over batch and dimensions (the script sums the exit terms, weight 1)."""
    num_exits = len(logits)
    target = sum(z / num_exits for z in logits).detach()
    target_features = sum(f / num_exits for f in features).detach()
    total = sum(F.cross_entropy(z, labels) for z in logits)
    if output == "KL":
        probs = torch.softmax(target / temperature, dim=1)
        total = total + sum(0.1 * _soft_ce(z, probs, temperature) * temperature**2 for z in logits)
    else:
        total = total + sum(F.mse_loss(z, target) for z in logits)
    return total + sum(_masked_square(f, target_features).abs().mean() for f in features)


# mary-phuong/multiexit-distillation, main.py (DistillationBasedLoss) and train_cifar.py
# @ 041fddf2e56e0f0b6d0bcb70c904edb1205e9936
class PhuongLampertReference:
    """The distillation-based loss with its temperature annealing, as a stateful callable.

    Each call returns global_scale * [(1-C) sum of every exit's CE + C T^2 sum over the
    shallower exits of their soft CE against the final exit's detached probabilities at T],
    and afterwards multiplies T by `t_mult` if the final exit's mean max-probability at T
    (in that same call) exceeded `max_prob`. T starts at 1; global_scale is 2 * 5 / K.
    """

    def __init__(self, num_exits: int, c: float = 0.5, max_prob: float = 0.5, t_mult=1.05):
        self.c, self.max_prob, self.t_mult = c, max_prob, t_mult
        self.global_scale = 2.0 * 5 / num_exits
        self.T = 1.0

    def __call__(self, logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        loss = (1.0 - self.c) * F.cross_entropy(logits[-1], labels)
        final_probs = torch.softmax(logits[-1].detach() / self.T, dim=1)
        for z in logits[:-1]:
            loss = loss + (1.0 - self.c) * F.cross_entropy(z, labels)
            loss = loss + self.T**2 * self.c * _soft_ce(z, final_probs, self.T)
        if final_probs.max(dim=1).values.mean() > self.max_prob:
            self.T *= self.t_mult
        return loss * self.global_scale


# ifding/DLKD, helper/losses.py (CorrLoss) @ 666dd4ac701caf33010dfb2730ffa1fde4f04271
def dlkd_correlation_reference(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """F.kl_div(log_softmax(S_s / 0.5), softmax(S_t / 0.5), batchmean) with S the cosine
    similarity of each sample to every sample: the student's features after its MLP head,
    the teacher's raw features, detached. DLKD pairs augmented views with normal views; a
    multi-exit network sees one view, so here rows and columns are the same batch."""

    def similarities(f: torch.Tensor) -> torch.Tensor:
        unit = f / f.norm(dim=1, keepdim=True)
        return unit @ unit.T  # [B, B] cosine of every pair

    log_q = torch.log_softmax(similarities(projected) / 0.5, dim=1)
    p = torch.softmax(similarities(teacher.detach()) / 0.5, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean")


# airaria/TextBrewer, src/textbrewer/schedulers.py @ d41c255fced4d7a995ae90d5aca5a8ab4073787c
def textbrewer_temperature(
    dtd: DTDConfig, student: torch.Tensor, teacher: torch.Tensor
) -> torch.Tensor:
    """Per-sample temperatures base + (mean w - w) beta for one student [B, C] and its teacher.

    flsw: w = (1 - cos(student, teacher))^gamma on unit-normalised logits, as TextBrewer.
    cwsm: TextBrewer's w = 1 / (max softmax(student) + 1e-3), then divided by the batch's
    largest w: our documented change, so that one beta fits 10 and 100 classes.
    The project clamps the result at 0.1; TextBrewer does not clamp.
    """
    s, t = student.detach(), teacher.detach()
    if dtd.weighting == "flsw":
        s = s / torch.norm(s, dim=-1, keepdim=True)
        t = t / torch.norm(t, dim=-1, keepdim=True)
        w = torch.pow(1 - (s * t).sum(dim=-1), dtd.gamma)
    else:
        w = 1 / (torch.softmax(s, dim=-1).max(dim=-1).values + 1e-3)
        w = w / w.max()
    return (dtd.t0 + (w.mean() - w) * dtd.beta).clamp(min=0.1)


def _pair_kl(cfg: LossConfig, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One teacher t [B, C] -> student s [B, C] term: T^2 mean_i KL(p_i || softmax(s_i / T)),
    or with dtd t0^2 mean_i KL(p_i || softmax(s_i / tau_i)) (TextBrewer's per-sample form)."""
    batch, num_classes = s.shape
    rows = torch.arange(batch, device=s.device)
    if cfg.dtd is None:
        tau = torch.full((batch,), cfg.temperature, device=s.device)
        scale = cfg.temperature
    else:
        tau = textbrewer_temperature(cfg.dtd, s, t)
        scale = cfg.dtd.t0
    p = torch.softmax(t / tau[:, None], dim=1)
    argmax = t.argmax(dim=1)
    if cfg.teacher_adjust == "lsr":
        smooth = torch.full((batch, num_classes), 0.1 / num_classes, device=s.device)
        smooth[rows, y] += 0.9
        p = torch.where((argmax != y)[:, None], smooth, p)
    elif cfg.teacher_adjust == "ps":
        p = p.clone()
        p_argmax, p_label = p[rows, argmax].clone(), p[rows, y].clone()
        p[rows, argmax] = p_label
        p[rows, y] = p_argmax
    log_q = torch.log_softmax(s / tau[:, None], dim=1)
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=1)
    return scale**2 * kl.mean()


def naive_mate_loss(
    cfg: LossConfig,
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    projections: torch.Tensor | None = None,
    kd_rampup: float = 1.0,
) -> torch.Tensor:
    """The MATE total loss, written as loops over exits, teachers and samples.

    teacher_logits: static a [K, K] or per-sample scores [B, K, K]."""
    num_exits, batch = logits.shape[:2]
    z = [logits[k].float() for k in range(num_exits)]
    scores = teacher_logits.float()
    if scores.dim() == 2:
        scores = scores.expand(batch, num_exits, num_exits)

    def teacher(j: int, exits: list[torch.Tensor]) -> torch.Tensor:
        rows = []
        for i in range(batch):
            a = scores[i, j]
            if cfg.teacher_support == "deeper":  # teacher j mixes exits j..K only
                a = torch.cat([a[:j] - torch.inf, a[j:]])
            w = torch.softmax(a, dim=0)
            rows.append(sum(w[k] * exits[k][i] for k in range(num_exits)))
        return torch.stack(rows)

    teachers = [teacher(j, z) for j in range(num_exits)]
    lam, mu = cfg.kd_weight, cfg.primary_weight
    exit_ce_weight = 1.0 if cfg.exit_ce_weight == "one" else 1.0 - lam

    loss = torch.zeros((), device=logits.device)
    for k in range(num_exits):
        loss = loss + exit_ce_weight * F.cross_entropy(z[k], labels)
    if cfg.teacher_ce != "none":
        constants = [x.detach() for x in z]
        for j in range(num_exits):
            t_j = teachers[j] if cfg.teacher_ce == "exits" else teacher(j, constants)
            loss = loss + F.cross_entropy(t_j, labels)
    for k in range(num_exits):
        for j in range(num_exits):
            weight = mu if j == k else (1.0 - mu) / (num_exits - 1)
            target = teachers[j].detach() if cfg.detach_targets else teachers[j]
            loss = loss + lam * kd_rampup * weight * _pair_kl(cfg, target, z[k], labels)
    if cfg.correlation_weight > 0.0:
        for k in range(num_exits - 1):
            loss = loss + cfg.correlation_weight * dlkd_correlation_reference(
                projections[k].float(), features[-1].float()
            )
    return loss


# DefangChen/OKDDip, models/model_cifar/resnet_GL.py (ResNet.forward, `en=True`)
# @ c6a05de892fc7d2b6767668548786688a388c2d6
def okddip_group_targets(
    pooled: list[torch.Tensor],
    logits: list[torch.Tensor],
    query_weight: torch.Tensor,
    key_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OKDDip's peer targets: each branch's pooled feature [B, D] through the shared bias-free
    query and key Linear(D, D // 8) (weights [P, D]); energy = bmm(q, k^T) over branches,
    attention = softmax over its last axis; x_m = bmm(logits [B, C, N], attention^T).
    Returns (attention [B, N, N], x_m [B, C, N]), built branch by branch with torch.cat as
    their loop does."""
    proj_q = proj_k = pro = None
    for f, z in zip(pooled, logits, strict=True):
        q = (f @ query_weight.T)[:, None, :]  # B x 1 x P
        k = (f @ key_weight.T)[:, None, :]
        column = z.unsqueeze(-1)  # B x C x 1
        proj_q = q if proj_q is None else torch.cat([proj_q, q], 1)
        proj_k = k if proj_k is None else torch.cat([proj_k, k], 1)
        pro = column if pro is None else torch.cat([pro, column], -1)
    energy = torch.bmm(proj_q, proj_k.permute(0, 2, 1))
    attention = F.softmax(energy, dim=-1)
    return attention, torch.bmm(pro, attention.permute(0, 2, 1))


# Lan1991Xu/ONE_NeurIPS2018, utils/ramps.py `sigmoid_rampup`
# @ 54afde30fe039c8bd66668f0d17944b451b8b189; DefangChen/OKDDip, train_GL.py
# `get_current_consistency_weight` @ c6a05de892fc7d2b6767668548786688a388c2d6 (the same).
def consistency_rampup(current: float, rampup_length: float) -> float:
    """exp(-5 (1 - clip(current, 0, length) / length)^2); 1 for length 0. Both scripts call
    it once per epoch with the 0-based epoch and length 80 (of 300 epochs)."""
    if rampup_length == 0:
        return 1.0
    current = min(max(current, 0.0), rampup_length)
    phase = 1.0 - current / rampup_length
    return math.exp(-5.0 * phase * phase)
