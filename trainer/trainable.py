"""The Ray Tune function trainable: trial config -> engine -> ``ray.tune.report`` each epoch.

A trial config is ``{"job": <job config dict>, "overrides": {"loss.temperature": 4.0, ...}}``:
the base job plus the dotted keys a searcher sampled. Only the ``ray.tune`` session API is
used (``ray.train.report`` raises inside Tune).

A trial that fails for a reason a retry cannot fix (a non-finite loss, a config or data set
this worker cannot use) reports one last result ``{"error": "<Type>: <message>"}`` and ends,
instead of raising: Ray would retry it from its last checkpoint, only to fail the same way.
Anything else (a crash, a lost node, a CUDA error) raises, and Ray retries the trial.

Each epoch's checkpoint also holds ``anytime.json``, the epoch's anytime curve
(:class:`trainer.metrics.AnytimeCurve`), so the driver can plot how the trial ended without
a second evaluation pass.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from ray import tune

from trainer.config import ConfigError, JobConfig, apply_overrides, parse_job_config
from trainer.data import DataError
from trainer.engine import (
    NonFiniteLossError,
    build_job,
    fit,
    load_checkpoint,
    model_metrics,
    save_checkpoint,
)

__all__ = ["ANYTIME_FILE", "TRIAL_ERROR", "job_config_from_trial", "train_job"]

ANYTIME_FILE = "anytime.json"  # beside checkpoint.pt in every trial checkpoint

TRIAL_ERROR = "error"  # result key of a trial that failed for good (see module docstring)
_FINAL_ERRORS = (ConfigError, DataError, NonFiniteLossError)


def job_config_from_trial(config: Mapping[str, Any]) -> JobConfig:
    """The validated job config of one trial."""
    base = parse_job_config(config["job"], source="trial config")
    return apply_overrides(base, config.get("overrides", {}), source="trial config")


def train_job(config: dict[str, Any]) -> None:
    """Run one trial, resuming from Tune's checkpoint when the trial is restored."""
    try:
        _train(config)
    except _FINAL_ERRORS as err:
        tune.report({TRIAL_ERROR: f"{type(err).__name__}: {err}"})


def _train(config: dict[str, Any]) -> None:
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
            if job.anytime is not None:
                (Path(directory) / ANYTIME_FILE).write_text(json.dumps(asdict(job.anytime)))
            tune.report(
                {**metrics, **constants}, checkpoint=tune.Checkpoint.from_directory(directory)
            )

    fit(job, on_epoch=report)
