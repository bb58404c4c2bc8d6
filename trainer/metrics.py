"""Metric names (the one place that defines them, docs/design.md §4) and anytime evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads where a function needs it: the names stay light to import
    import torch

__all__ = [
    "ANYTIME_ACC",
    "ANYTIME_AUC",
    "ANYTIME_GFLOPS",
    "ENSEMBLE_ACC",
    "EPOCH",
    "EPOCH_TIME",
    "LR",
    "MEAN_EXIT_ACC",
    "TEACHER_DIVERSITY",
    "TRAIN_LOSS",
    "TRAIN_TEMPERATURE",
    "AnytimeCurve",
    "anytime_auc",
    "anytime_curve",
    "epoch_metric_names",
    "exit_acc",
    "exit_at_threshold",
    "exit_gflops",
    "exit_loss",
    "kind_metric_names",
    "teacher_acc",
    "teacher_diversity",
    "teacher_spread",
    "teacher_weight",
]

EPOCH = "epoch"
TRAIN_LOSS = "train/loss"
LR = "lr"
EPOCH_TIME = "epoch_time_s"
ENSEMBLE_ACC = "val/ensemble/acc"
MEAN_EXIT_ACC = "val/mean_exit_acc"
ANYTIME_AUC = "val/anytime_auc"
ANYTIME_ACC = "val/anytime_acc"
ANYTIME_GFLOPS = "val/anytime_gflops"
TEACHER_DIVERSITY = "teachers/diversity"  # mate: mean pairwise TV distance of teacher weights
TRAIN_TEMPERATURE = "train/temperature"  # phuong_lampert: the annealed T after the epoch


def exit_acc(k: int, split: str = "val") -> str:
    return f"{split}/exit{k}/acc"


def exit_loss(k: int, split: str = "val") -> str:
    return f"{split}/exit{k}/loss"


def exit_gflops(k: int) -> str:
    return f"exit{k}/gflops"


def teacher_acc(j: int, split: str = "val") -> str:
    """Accuracy of MATE's ensemble teacher t_j (1-based)."""
    return f"{split}/teacher{j}/acc"


def teacher_weight(j: int, k: int) -> str:
    """The weight MATE's teacher j gives exit k (both 1-based), mean over the validation
    samples (the attention weight network's are per sample; static ones are the same for all)."""
    return f"teacher{j}/exit{k}/weight"


def teacher_spread(j: int) -> str:
    """How much MATE's teacher j's weights vary across validation samples: the mean
    total-variation distance of a sample's weights from their mean (0 for static weights)."""
    return f"teacher{j}/weight_spread"


def with_split(name: str, split: str) -> str:
    """`val/...` metric name moved to another split (``test`` for the promoted job)."""
    return name.replace("val/", f"{split}/", 1)


def kind_metric_names(kind: str, num_exits: int) -> list[str]:
    """The per-epoch metrics only some loss kinds report: MATE's teachers, phuong_lampert's
    annealed temperature."""
    exits = range(1, num_exits + 1)
    if kind == "mate":
        weights = [teacher_weight(j, k) for j in exits for k in exits]
        spreads = [teacher_spread(j) for j in exits]
        return [*(teacher_acc(j) for j in exits), *weights, *spreads, TEACHER_DIVERSITY]
    if kind == "phuong_lampert":
        return [TRAIN_TEMPERATURE]
    return []


def epoch_metric_names(num_exits: int, kind: str | None = None) -> list[str]:
    """Every metric a training job reports each epoch (with `kind`, its kind's extras too)."""
    exits = range(1, num_exits + 1)
    per_exit = [f(k) for k in exits for f in (exit_acc, exit_loss)]
    train_per_exit = [exit_loss(k, "train") for k in exits]
    extra = [] if kind is None else kind_metric_names(kind, num_exits)
    return [
        EPOCH,
        TRAIN_LOSS,
        *train_per_exit,
        LR,
        *per_exit,
        ENSEMBLE_ACC,
        MEAN_EXIT_ACC,
        ANYTIME_AUC,
        ANYTIME_ACC,
        ANYTIME_GFLOPS,
        EPOCH_TIME,
        *extra,
    ]


def teacher_diversity(weights: torch.Tensor) -> torch.Tensor:
    """Mean pairwise total-variation distance between teachers' weight vectors.

    weights [J, K] (rows sum to 1) -> [] in [0, 1]: 0 when every teacher mixes the exits
    alike (one ensemble in J copies), 1 when no two teachers share an exit; 0 for J = 1.
    """
    num_teachers = weights.shape[0]
    if num_teachers < 2:
        return weights.new_zeros(())
    tv = 0.5 * (weights[:, None] - weights[None]).abs().sum(dim=-1)  # [J, J]
    return tv.sum() / (num_teachers * (num_teachers - 1))


def exit_at_threshold(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index of the exit each sample leaves at, per threshold.

    confidence: [K, N] max softmax per exit; thresholds: [T]. Returns [T, N] long: the first
    exit whose confidence reaches the threshold, or the last exit if none does.
    """
    leaves = confidence.unsqueeze(0) >= thresholds.view(-1, 1, 1)  # [T, K, N]
    leaves[:, -1] = True
    return leaves.int().argmax(dim=1)  # argmax returns the first maximal index


def anytime_curve(
    confidence: torch.Tensor,
    correct: torch.Tensor,
    cumulative_gflops: torch.Tensor,
    thresholds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accuracy and cost of confidence-based early exiting.

    confidence, correct: [K, N]; cumulative_gflops: [K]. Returns (accuracy [T],
    mean GFLOPs per sample [T], cost relative to the full network [T]).
    """
    exit_index = exit_at_threshold(confidence, thresholds)  # [T, N]
    hit = correct.float().gather(0, exit_index).mean(dim=1)  # gather along K per threshold
    gflops = cumulative_gflops.to(confidence.device)[exit_index].mean(dim=1)
    return hit, gflops, gflops / cumulative_gflops[-1]


def anytime_auc(accuracy: torch.Tensor, relative_cost: torch.Tensor) -> float:
    """Area under the best-accuracy-within-budget curve over relative cost in [0, 1].

    Below the cheapest operating point nothing can be predicted (accuracy 0); between points
    the curve is the running maximum, linearly interpolated; it stays flat up to cost 1.
    1.0 would mean perfect accuracy at zero cost.
    """
    import torch  # noqa: PLC0415  (the command line reads the names without torch)

    order = torch.argsort(relative_cost)
    cost = relative_cost[order].double().clamp(0.0, 1.0)
    acc = torch.cummax(accuracy[order].double(), dim=0).values
    area = torch.trapezoid(acc, cost) + acc[-1] * (1.0 - cost[-1])
    return float(area)


def default_thresholds(steps: int = 101) -> torch.Tensor:
    """Thresholds from 0 (everyone leaves at exit 1) to just above 1 (everyone reaches K)."""
    import torch  # noqa: PLC0415  (the command line reads the names without torch)

    return torch.cat([torch.linspace(0.0, 1.0, steps), torch.tensor([1.0 + 1e-6])])


@dataclass(frozen=True)
class AnytimeCurve:
    """One evaluation's anytime curve, as plain lists for JSON: per confidence threshold θ
    (ascending), the accuracy and the mean cost relative to the full network; and the
    operating threshold `train.exit_threshold`."""

    thresholds: list[float]
    accuracy: list[float]
    relative_cost: list[float]
    operating_threshold: float
