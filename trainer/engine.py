"""Fit / evaluate loops, checkpoints, per-exit and anytime metrics for one training job.

Knows nothing of Ray or MLflow: callers pass an ``on_epoch`` callback that receives the
epoch's metrics and can save a checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trainer import metrics as M
from trainer.config import ConfigError, JobConfig, OptimConfig
from trainer.data import DataSplits, DeviceLoader, ImageTensors, load_splits
from trainer.losses import (
    annealed_temperature,
    init_teacher_logits,
    mix_exits,
    multi_exit_loss,
    rampup,
    teacher_weights,
)
from trainer.models import MultiExitNet, create_model, exit_gflops
from trainer.precision import autocast_dtype

__all__ = [
    "Job",
    "NonFiniteLossError",
    "build_job",
    "evaluate",
    "fit",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.pt"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the job cannot continue."""


@dataclass
class Job:
    """Everything one training run owns; `epoch` counts completed epochs."""

    cfg: JobConfig
    device: torch.device
    data: DataSplits
    model: MultiExitNet
    teacher_logits: nn.Parameter | None  # [K, K] MATE's static teacher weights, else None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # drives shuffling and augmentation
    gflops: list[float]  # cumulative GFLOPs per sample to reach each exit
    autocast_dtype: torch.dtype | None  # bf16 or None (float32): `train.precision` on `device`
    temperature: torch.Tensor | None = None  # [] phuong_lampert's annealed T, else None
    epoch: int = 0
    anytime: M.AnytimeCurve | None = None  # the latest evaluation's curve, for plots

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda"

    def loader(self, split: ImageTensors, *, train: bool) -> DeviceLoader:
        # Projection heads (BatchNorm1d) and batch similarities need whole batches: an epoch's
        # remainder is dropped then (a fresh permutation each epoch still visits every sample).
        drop_last = train and self.model.projectors is not None
        return DeviceLoader(
            split,
            self.cfg.train.batch_size,
            mean=self.data.mean,
            std=self.data.std,
            train=train,
            pad=self.data.pad,
            flip=self.data.flip,
            generator=self.generator if train else None,
            channels_last=self.channels_last,
            drop_last=drop_last,
        )


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`train.device` is {spec!r}, but no CUDA device is available")
    return torch.device(spec)


def lr_factor(cfg: OptimConfig, epochs: int, epoch: int) -> float:
    """Multiplier of the base learning rate during `epoch` (0-based): warm-up, then schedule."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.schedule == "cosine":
        span = max(1, epochs - cfg.warmup_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
    if cfg.schedule == "multistep":
        passed = sum(epoch >= round(m * epochs) for m in cfg.milestones)
        return cfg.gamma**passed
    return 1.0


def _optimizer(cfg: OptimConfig, model: MultiExitNet, teacher: nn.Parameter | None):
    """One group for the network; MATE's teacher weights in their own, at `teacher_lr`: the
    static vectors without weight decay, the attention weight network with it (OKDDip trains
    its projections with the rest of the model)."""
    network = model.weight_network
    attention = [] if network is None else list(network.parameters())
    taken = {id(p) for p in attention}
    groups: list[dict[str, Any]] = [
        {"params": [p for p in model.parameters() if id(p) not in taken]}
    ]
    if attention:
        groups.append({"params": attention, "lr": cfg.teacher_lr or cfg.lr})
    if teacher is not None:
        groups.append({"params": [teacher], "weight_decay": 0.0, "lr": cfg.teacher_lr or cfg.lr})
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_job(cfg: JobConfig, *, data: DataSplits | None = None) -> Job:
    """Seed everything, load data onto the device, build model, teachers and optimizer."""
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = data or load_splits(cfg.dataset, device, seed=cfg.train.seed)
    model = create_model(
        cfg.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        projection_heads=cfg.loss.uses_correlation,
        weight_network=cfg.loss.kind == "mate" and cfg.loss.teacher_weights == "attention",
    )
    gflops = exit_gflops(model, (data.in_channels, data.image_size, data.image_size))
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    teacher = None
    if cfg.loss.kind == "mate" and cfg.loss.teacher_weights == "static":
        init = init_teacher_logits(cfg.num_exits, cfg.loss.teacher_init)
        teacher = nn.Parameter(init.to(device))
    optimizer = _optimizer(cfg.optim, model, teacher)
    epochs = cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(cfg.optim, epochs, e)
    )
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.train.seed)
    temperature = None
    if cfg.loss.kind == "phuong_lampert":  # annealed per step, so it is training state
        temperature = torch.tensor(cfg.loss.temperature, dtype=torch.float32, device=device)
    dtype = autocast_dtype(cfg.train.precision, device)  # warns once where bf16 is emulated
    return Job(
        cfg,
        device,
        data,
        model,
        teacher,
        optimizer,
        scheduler,
        generator,
        gflops,
        dtype,
        temperature,
    )


def train_one_epoch(job: Job) -> dict[str, float]:
    """One pass over the training split; returns `train/loss`, each exit's mean cross entropy
    against the labels (`train/exit{k}/loss`), the epoch's `lr` and, for phuong_lampert,
    `train/temperature` (the annealed T after the epoch's last step)."""
    loss_cfg = job.cfg.loss
    job.model.train()
    lr = job.optimizer.param_groups[0]["lr"]
    kd_rampup = rampup(job.epoch, job.cfg.train.epochs, loss_cfg.kd_rampup)
    total = torch.zeros((), device=job.device)
    exit_ce = torch.zeros(job.cfg.num_exits, device=job.device)
    seen = 0
    for inputs, labels in job.loader(job.data.train, train=True):
        with torch.autocast(job.device.type, job.autocast_dtype, enabled=bool(job.autocast_dtype)):
            out = job.model(inputs)
        loss = multi_exit_loss(
            loss_cfg,
            out.logits,
            out.features,
            labels,
            job.teacher_logits if out.teacher_scores is None else out.teacher_scores,
            temperature=job.temperature,
            projections=out.projections,
            kd_rampup=kd_rampup,
        )
        job.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        job.optimizer.step()
        if job.temperature is not None:
            job.temperature = annealed_temperature(
                job.temperature, out.logits[-1], loss_cfg.anneal_factor, loss_cfg.anneal_max_prob
            )
        total += loss.total.detach() * labels.numel()  # stays on device: no per-batch sync
        exit_ce += loss.per_exit_ce * labels.numel()
        seen += labels.numel()
    job.scheduler.step()
    job.epoch += 1
    mean_loss = total.item() / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(
            f"training loss is {mean_loss} in epoch {job.epoch}; lower optim.lr "
            f"(now {job.cfg.optim.lr}) or loss.temperature, or use train.precision: fp32"
        )
    result = {M.TRAIN_LOSS: mean_loss, M.LR: lr}
    for k, ce in enumerate((exit_ce / max(seen, 1)).tolist(), start=1):
        result[M.exit_loss(k, "train")] = ce
    if job.temperature is not None:
        result[M.TRAIN_TEMPERATURE] = job.temperature.item()
    return result


class Predictions(NamedTuple):
    logits: torch.Tensor  # [K, N, C] float32, split order
    teacher_scores: torch.Tensor | None  # MATE: [K, K] static or [N, K, K] attention, else None


@torch.no_grad()
def predict(job: Job, split: ImageTensors) -> Predictions:
    """Logits of every exit on a whole split and, for MATE, its teachers' scores (the weight
    network run on the exits' features, or the static a_j)."""
    job.model.eval()
    network = job.model.weight_network
    logits, scores = [], []
    for inputs, _ in job.loader(split, train=False):
        with torch.autocast(job.device.type, job.autocast_dtype, enabled=bool(job.autocast_dtype)):
            out = job.model(inputs)
            if network is not None:
                scores.append(network(out.features).float())
        logits.append(out.logits.float())
    if network is not None:
        return Predictions(torch.cat(logits, dim=1), torch.cat(scores))
    static = None if job.teacher_logits is None else job.teacher_logits.detach()
    return Predictions(torch.cat(logits, dim=1), static)


def _teacher_values(
    logits: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, support: str
) -> tuple[list[str], torch.Tensor]:
    """MATE's teachers on a split: accuracy, weights over the exits (mean over the samples),
    how far a sample's weights stray from that mean, and the teachers' diversity."""
    weights = teacher_weights(scores, support)  # [J, K] or [N, J, K]
    accuracy = (mix_exits(weights, logits).argmax(dim=-1) == labels).float().mean(dim=1)  # [J]
    if weights.dim() == 2:
        weights = weights[None]
    mean = weights.mean(dim=0)  # [J, K]
    spread = 0.5 * (weights - mean).abs().sum(dim=-1).mean(dim=0)  # [J] mean TV from the mean
    teachers = range(1, mean.shape[0] + 1)
    exits = range(1, mean.shape[1] + 1)
    names = [
        *(M.teacher_acc(j) for j in teachers),
        *(M.teacher_weight(j, k) for j in teachers for k in exits),
        *(M.teacher_spread(j) for j in teachers),
        M.TEACHER_DIVERSITY,
    ]
    values = torch.cat([accuracy, mean.flatten(), spread, M.teacher_diversity(mean)[None]])
    return names, values


def evaluate(job: Job, split: ImageTensors, prefix: str = "val") -> dict[str, float]:
    """Per-exit accuracy and loss, ensemble and mean-exit accuracy, anytime metrics and, for
    MATE, its teachers (:func:`_teacher_values`)."""
    logits, scores = predict(job, split)  # [K, N, C]
    labels = split.labels
    num_exits = logits.shape[0]
    probs = logits.softmax(dim=-1)
    confidence, predicted = probs.max(dim=-1)  # [K, N]
    correct = predicted == labels  # [K, N]
    per_exit_acc = correct.float().mean(dim=1)  # [K]
    per_exit_loss = F.cross_entropy(
        logits.flatten(0, 1), labels.repeat(num_exits), reduction="none"
    ).view(num_exits, -1)
    ensemble_acc = (probs.mean(dim=0).argmax(dim=-1) == labels).float().mean()

    gflops = torch.tensor(job.gflops, dtype=torch.float64, device=logits.device)
    thresholds = M.default_thresholds()
    acc_curve, _, cost_curve = M.anytime_curve(confidence, correct, gflops, thresholds)
    operating = torch.tensor([job.cfg.train.exit_threshold], device=logits.device)
    op_acc, op_gflops, _ = M.anytime_curve(confidence, correct, gflops, operating)

    teacher_names: list[str] = []
    teacher_values = torch.zeros(0, device=logits.device)
    if scores is not None:
        support = job.cfg.loss.teacher_support
        teacher_names, teacher_values = _teacher_values(logits, scores, labels, support)

    values = torch.cat(
        [
            per_exit_acc,
            per_exit_loss.mean(dim=1),
            torch.stack(
                [ensemble_acc, per_exit_acc.mean(), op_acc[0].float(), op_gflops[0].float()]
            ),
            teacher_values,
        ]
    ).tolist()  # one device sync for all metrics
    names = [
        *(M.exit_acc(k) for k in range(1, num_exits + 1)),
        *(M.exit_loss(k) for k in range(1, num_exits + 1)),
        M.ENSEMBLE_ACC,
        M.MEAN_EXIT_ACC,
        M.ANYTIME_ACC,
        M.ANYTIME_GFLOPS,
        *teacher_names,
    ]
    result = dict(zip(names, values, strict=True))
    acc_curve, cost_curve = acc_curve.cpu(), cost_curve.cpu()
    result[M.ANYTIME_AUC] = M.anytime_auc(acc_curve, cost_curve)
    job.anytime = M.AnytimeCurve(
        thresholds.tolist(), acc_curve.tolist(), cost_curve.tolist(), job.cfg.train.exit_threshold
    )
    return {M.with_split(name, prefix): value for name, value in result.items()}


def model_metrics(job: Job) -> dict[str, float]:
    """Per-model constants: cumulative GFLOPs per sample to reach each exit."""
    return {M.exit_gflops(k): g for k, g in enumerate(job.gflops, start=1)}


def fit(job: Job, on_epoch: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
    """Train from `job.epoch` to `train.epochs`, evaluating on the validation split (the
    test split when there is none) after each epoch; returns the last epoch's metrics."""
    split, prefix = (job.data.val, "val") if job.data.val is not None else (job.data.test, "test")
    result: dict[str, float] = {}
    while job.epoch < job.cfg.train.epochs:
        start = time.perf_counter()
        train_metrics = train_one_epoch(job)
        eval_metrics = evaluate(job, split, prefix)
        if job.device.type == "cuda":
            torch.cuda.synchronize(job.device)
        result = {
            M.EPOCH: job.epoch,
            **train_metrics,
            **eval_metrics,
            M.EPOCH_TIME: time.perf_counter() - start,
        }
        if on_epoch is not None:
            on_epoch(result)
    return result


def state_dict(job: Job) -> dict[str, Any]:
    """Everything needed to continue exactly where the job stopped (tensors and plain data)."""
    state: dict[str, Any] = {
        "config": job.cfg.to_dict(),
        "epoch": job.epoch,
        "model": job.model.state_dict(),
        "optimizer": job.optimizer.state_dict(),
        "scheduler": job.scheduler.state_dict(),
        "generator": job.generator.get_state(),
        "cpu_rng": torch.get_rng_state(),
    }
    if job.teacher_logits is not None:
        state["teacher_logits"] = job.teacher_logits.detach()
    if job.temperature is not None:
        state["temperature"] = job.temperature
    if job.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(job.device)
    return state


def load_state_dict(job: Job, state: dict[str, Any]) -> None:
    job.model.load_state_dict(state["model"])
    if job.teacher_logits is not None:
        job.teacher_logits.data.copy_(state["teacher_logits"])
    if job.temperature is not None:
        job.temperature = state["temperature"].to(job.device)
    job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    job.generator.set_state(state["generator"])
    torch.set_rng_state(state["cpu_rng"])
    if "cuda_rng" in state and job.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], job.device)
    job.epoch = state["epoch"]


def save_checkpoint(job: Job, directory: str | Path) -> Path:
    path = Path(directory) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict(job), path)
    return path


def load_checkpoint(job: Job, directory: str | Path) -> None:
    state = torch.load(
        Path(directory) / CHECKPOINT_FILE, map_location=job.device, weights_only=True
    )
    load_state_dict(job, state)
