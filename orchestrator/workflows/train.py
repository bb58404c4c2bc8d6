"""``orchestrate train``: one training job, without Ray: its checkpoint and final metrics
written to a directory."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from orchestrator.entities.names import METRICS_FILE
from orchestrator.stores.preflight import check_writable_dir
from trainer.config import JobConfig
from trainer.engine import Job, build_job, fit, model_metrics, save_checkpoint

__all__ = ["prepare_job", "train"]


def prepare_job(cfg: JobConfig, output: str | Path) -> tuple[Job, Path]:
    """The built job and the directory its results go to (which must be one, if it exists)."""
    out_dir = check_writable_dir(output, "--output")
    return build_job(cfg), out_dir


def train(
    job: Job, out_dir: Path, on_epoch: Callable[[Mapping[str, float]], None]
) -> dict[str, float]:
    """Train `job` to the end, save its checkpoint and final metrics into `out_dir`; returns
    the final metrics."""
    final = fit(job, on_epoch=on_epoch) | model_metrics(job)
    save_checkpoint(job, out_dir)
    (out_dir / METRICS_FILE).write_text(json.dumps(final, indent=2) + "\n")
    return final
