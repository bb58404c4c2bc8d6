"""Naive reference for the MATE loss: one Python iteration per (teacher, student) pair.

Written straight from DESIGN §3, independently of trainer/losses.py, so that
tests/test_losses.py can check the batched implementation against it and
bench/bench_loss.py can time the two side by side. Not part of the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config import LossConfig

__all__ = ["naive_mate_loss"]


def _pair_kl(cfg: LossConfig, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i tau_i^2 KL(p_i || softmax(s_i / tau_i)) for one teacher t [B, C], student s [B, C]."""
    batch, num_classes = s.shape
    rows = torch.arange(batch, device=s.device)
    if cfg.dtd is None:
        tau = torch.full((batch,), cfg.temperature, device=s.device)
    else:
        d = cfg.dtd
        if d.weighting == "cwsm":
            w = 1.0 / (torch.softmax(s.detach(), dim=1).max(dim=1).values + 1e-3)
        else:
            sd = s.detach()
            cos = (sd * t).sum(1) / (sd.norm(dim=1) * t.norm(dim=1))
            w = (1.0 - cos).clamp(min=0.0) ** d.gamma
        tau = (d.t0 + d.beta * (w.mean() - w)).clamp(min=0.1)
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
    return (tau**2 * kl).mean()


def _correlation(f_student: torch.Tensor, f_final: torch.Tensor) -> torch.Tensor:
    def sim(f: torch.Tensor) -> torch.Tensor:
        f = f / f.norm(dim=1, keepdim=True)
        return f @ f.T / 0.5

    p = torch.softmax(sim(f_final.detach()), dim=1)
    log_q = torch.log_softmax(sim(f_student), dim=1)
    return (torch.xlogy(p, p) - p * log_q).sum(dim=1).mean()


def naive_mate_loss(
    cfg: LossConfig,
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
) -> torch.Tensor:
    """The MATE total loss, written as loops over exits and exit pairs."""
    num_exits = logits.shape[0]
    z = [logits[k].float() for k in range(num_exits)]
    w = torch.softmax(teacher_logits.float(), dim=1)
    teachers = [sum(w[j, k] * z[k] for k in range(num_exits)) for j in range(num_exits)]
    lam, mu = cfg.kd_weight, cfg.primary_weight

    loss = torch.zeros((), device=logits.device)
    for k in range(num_exits):
        loss = loss + (1.0 - lam) * F.cross_entropy(z[k], labels)
    for j in range(num_exits):
        loss = loss + F.cross_entropy(teachers[j], labels)
    for k in range(num_exits):
        for j in range(num_exits):
            weight = mu if j == k else (1.0 - mu) / (num_exits - 1)
            loss = loss + lam * weight * _pair_kl(cfg, teachers[j].detach(), z[k], labels)
    if cfg.correlation_weight > 0.0:
        for k in range(num_exits - 1):
            loss = loss + cfg.correlation_weight * _correlation(
                features[k].float(), features[-1].float()
            )
    return loss
