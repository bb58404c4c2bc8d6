"""The Ray Tune function trainable: trial config -> engine -> ``ray.tune.report`` each epoch.

A trial config is ``{"job": <job config dict>, "overrides": {"loss.temperature": 4.0, ...}}``:
the base job plus the dotted keys a searcher sampled. Only the ``ray.tune`` session API is
used (``ray.train.report`` raises inside Tune).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

import ray
from ray import tune

from trainer.config import JobConfig, apply_overrides, parse_job_config
from trainer.engine import build_job, fit, load_checkpoint, model_metrics, save_checkpoint

__all__ = ["job_config_from_trial", "train_job"]


def job_config_from_trial(config: Mapping[str, Any]) -> JobConfig:
    """The validated job config of one trial."""
    base = parse_job_config(config["job"], source="trial config")
    return apply_overrides(base, config.get("overrides", {}), source="trial config")


def train_job(config: dict[str, Any]) -> None:
    """Run one trial, resuming from Tune's checkpoint when the trial is restored."""
    job = build_job(job_config_from_trial(config))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_checkpoint(job, directory)
    # Per-model constants, and the Ray node the trial runs on (a run tag in MLflow).
    constants = {**model_metrics(job), "node_id": ray.get_runtime_context().get_node_id()}

    def report(metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(job, directory)
            tune.report(
                {**metrics, **constants}, checkpoint=tune.Checkpoint.from_directory(directory)
            )

    fit(job, on_epoch=report)
