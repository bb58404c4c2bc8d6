"""Build the sweep report, write it into a directory and log it to the sweep's parent run."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.entities.names import REPORT_FILE
from orchestrator.entities.sweep import SweepRecord
from orchestrator.rendering.report_page import TrialRow, render_page
from orchestrator.rendering.tables import best_summary, params_text
from orchestrator.report.panels import TOP_TRIALS, build_panels
from orchestrator.selection.trials import is_finished, objective_names, state_counts, top_trials
from orchestrator.stores.study import load_study

__all__ = ["build_report", "log_report", "log_report_or_warn", "write_report"]

logger = logging.getLogger(__name__)


def build_report(record: SweepRecord) -> str:
    """The report's HTML, from the sweep's study and MLflow runs as they are now."""
    panels = build_panels(record)
    study = load_study(record)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(state_counts(study).items()))
    meta = (
        f"{len(study.trials)}/{record.num_samples} trials ({counts})"
        + ("" if is_finished(study, record.num_samples) else " — still running")
        + f"; objectives: {record.spec().search.objectives_text}; {best_summary(study)}. "
        f"Generated {datetime.now():%Y-%m-%d %H:%M}."
    )
    top = [
        TrialRow(t.number, t.values, params_text(t.params)) for t in top_trials(study, TOP_TRIALS)
    ]
    return render_page(record.name, meta, objective_names(study), top, panels)


def write_report(record: SweepRecord, output_dir: str | Path) -> Path:
    """Write ``report.html`` into `output_dir` and return its path."""
    path = Path(output_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(record), encoding="utf-8")
    return path


def log_report(record: SweepRecord, path: Path | None = None) -> Path:
    """Write the report into the sweep directory (unless `path` is given) and log it to the
    sweep's parent run, replacing the previous one."""
    path = path or write_report(record, record.directory)
    MlflowClient(record.tracking_uri).log_artifact(record.parent_run_id, str(path))
    return path


def log_report_or_warn(record: SweepRecord) -> None:
    """:func:`log_report`; a failure is only a warning (a report is never worth a failed
    sweep)."""
    try:
        log_report(record)
    except Exception:
        logger.warning("could not write the report of sweep %s", record.name, exc_info=True)
