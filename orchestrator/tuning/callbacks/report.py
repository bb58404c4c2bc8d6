"""Writes the sweep report when the sweep ends (:mod:`orchestrator.report`)."""

from __future__ import annotations

from ray.tune import Callback

from orchestrator.entities.credentials import MaskedWhenPickled
from orchestrator.entities.sweep import SweepRecord
from orchestrator.report.build import log_report_or_warn

__all__ = ["ReportCallback"]


class ReportCallback(MaskedWhenPickled, Callback):
    """Writes the sweep report and logs it to the parent run when the sweep ends; runs after
    the tracking callback, which has applied every write by then."""

    _secret_fields = ("record",)  # Tune pickles callbacks into the sweep directory

    def __init__(self, record: SweepRecord) -> None:
        self.record = record

    def on_experiment_end(self, trials: list, **info) -> None:
        log_report_or_warn(self.record.revealed())
