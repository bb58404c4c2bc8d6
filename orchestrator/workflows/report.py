"""``orchestrate report``: write a recorded sweep's report and log it to its parent run."""

from __future__ import annotations

from pathlib import Path

from orchestrator.entities.sweep import SweepRecord
from orchestrator.report.build import log_report, write_report
from orchestrator.stores.preflight import check_output_dir

__all__ = ["report"]


def report(record: SweepRecord, output_dir: str | Path | None = None) -> Path:
    """Write ``report.html`` into `output_dir` (the sweep's directory by default), log it to
    the sweep's parent run, and return its path."""
    directory = check_output_dir(output_dir, record)
    path = write_report(record, directory)
    log_report(record, path)
    return path
