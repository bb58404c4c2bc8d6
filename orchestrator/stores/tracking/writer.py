"""A sweep's MLflow writes: journaled, applied in order on a background thread, retried.

Tune calls the tracking callback on its driver loop, between scheduling decisions, so a
slow or unreachable tracking server must not block it. :meth:`MlflowWriter.submit` appends
the write to a journal file in the sweep directory and returns; one thread applies the
journal in order, retrying while the store is unreachable, and records how far it got. A
driver killed with writes still pending leaves them in the journal, and the next writer on
that sweep (``orchestrate resume``) applies them first.

Every write can be applied twice (after a crash between applying it and recording that):
a trial's run is found by its Optuna trial number before one is created, identical metrics
are stored once by MLflow, and an epoch whose step the run already has is skipped, so a
trial restarted from an older checkpoint never writes the same epoch twice. The writer lists
the sweep's runs once, when it first needs one (those an earlier driver made), and
remembers those it creates, so a sweep of thousands of trials searches no runs per trial;
after a failed attempt, whose run MLflow may have created all the same, it searches again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests
import sqlalchemy
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient

from orchestrator.entities.names import (
    APPLIED_FILE,
    BEST_RUN_TAG,
    JOURNAL_FILE,
    PARETO_RUNS_TAG,
    PARETO_TAG,
)
from orchestrator.entities.sweep import SweepTarget
from orchestrator.stores.preflight import error_reason
from orchestrator.stores.sqlite import write_ahead
from orchestrator.stores.tracking.runs import find_trial_run, trial_runs

__all__ = ["MlflowWriter"]

logger = logging.getLogger(__name__)

_RETRY_FIRST_S, _RETRY_MAX_S = 0.5, 5.0
# MLflow error codes worth retrying: the server or its database is down or overloaded.
_TRANSIENT_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
)


def _transient(err: Exception) -> bool:
    if isinstance(err, MlflowException):
        return err.error_code in _TRANSIENT_CODES
    return isinstance(err, OSError | requests.RequestException | sqlalchemy.exc.OperationalError)


def _metrics(values: dict[str, float], timestamp: int, step: int) -> list[Metric]:
    return [Metric(key, float(value), timestamp, step) for key, value in values.items()]


def _tags(values: dict[str, str]) -> list[RunTag]:
    return [RunTag(key, str(value)) for key, value in values.items()]


class MlflowWriter:
    """Applies one sweep's writes: trial runs (children of the sweep's parent run, found by
    Optuna trial number) and the parent run's summary.

    Writes are dicts with an ``op``:
    ``run`` (trial, tags, params): find or create the trial's run; ``epoch`` (trial, step,
    time, metrics, optional tags); ``end`` (trial, status, metrics, tags); ``artifacts`` (trial,
    path, artifact_path); ``sweep`` (metrics, best_trial, pareto_trials, status or None) for
    the parent run. `handlers` apply further ops to a trial's run: ``handlers[op](client,
    run_id, write)``, for instance drawing figures once the trial's epochs are in.
    """

    def __init__(
        self,
        target: SweepTarget,
        *,
        step_metric: str,
        handlers: Mapping[str, Callable[[MlflowClient, str, dict[str, Any]], None]] = {},
    ) -> None:
        # MLflow's HTTP client retries a request for minutes by default; this thread retries
        # on its own, so keep each attempt short and notice a restarted server quickly.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self._client = MlflowClient(target.tracking_uri)
        store = self._client._tracking_client.store  # a local database: write ahead
        if isinstance(getattr(store, "engine", None), sqlalchemy.engine.Engine):
            write_ahead(store.engine)
        self._target = target
        self._experiment_id = target.experiment_id
        self._parent_run_id = target.parent_run_id
        self._step_metric = step_metric  # logged every epoch: its last step is the run's
        self._handlers = dict(handlers)
        self._journal = Path(target.directory) / JOURNAL_FILE
        self._applied_file = Path(target.directory) / APPLIED_FILE
        self._run_ids: dict[int, str] = {}
        self._last_step: dict[int, int] = {}
        self._listed: dict[int, str] | None = None  # runs there when first needed, by trial
        self._unsure = False  # the last attempt failed: MLflow may have applied it
        self._pending: deque[dict[str, Any]] = deque(self._read_pending())
        self._applied = self._read_applied()
        self._file = self._journal.open("a")
        self._changed = threading.Condition()
        self._closed = False
        self.dropped = 0  # writes MLflow refused for good (logged as warnings)
        self._thread = threading.Thread(target=self._work, name="mlflow-writer", daemon=True)
        self._thread.start()

    def _read_applied(self) -> int:
        try:
            return int(self._applied_file.read_text())
        except (OSError, ValueError):
            return 0

    def _read_pending(self) -> list[dict[str, Any]]:
        """Journal lines not yet applied; a torn last line (a kill mid-write) is cut off."""
        if not self._journal.exists():
            return []
        text = self._journal.read_text()
        complete = text[: text.rfind("\n") + 1]
        if complete != text:
            self._journal.write_text(complete)
        lines = complete.splitlines()
        return [json.loads(line) for line in lines[self._read_applied() :]]

    @property
    def pending(self) -> int:
        with self._changed:
            return len(self._pending)

    def submit(self, write: dict[str, Any]) -> None:
        """Journal `write` and queue it; returns at once."""
        line = json.dumps(write)
        with self._changed:
            self._file.write(line + "\n")
            self._file.flush()
            self._pending.append(write)
            self._changed.notify_all()

    def flush(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for every write to be applied; returns how many are
        still pending."""
        with self._changed:
            self._changed.wait_for(lambda: not self._pending, timeout)
            return len(self._pending)

    def close(self, timeout: float) -> int:
        """:meth:`flush`, then stop; returns how many writes are still pending (kept in the
        journal for the next writer). An emptied journal is removed."""
        self.flush(timeout)
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            left = len(self._pending)
            self._file.close()
            if not left:  # the count first: a journal without it is only applied again
                self._applied_file.unlink(missing_ok=True)
                self._journal.unlink(missing_ok=True)
            return left

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                write = self._pending[0]
            if not self._apply_with_retries(write):
                return  # closed while the store was down: the journal keeps the rest
            with self._changed:
                self._pending.popleft()
                self._applied += 1
                if not self._closed:
                    self._applied_file.write_text(f"{self._applied}\n")
                self._changed.notify_all()

    def _apply_with_retries(self, write: dict[str, Any]) -> bool:
        """Apply `write`, retrying transient failures; False when closed meanwhile."""
        delay = _RETRY_FIRST_S
        while True:
            try:
                self._apply(write)
                self._unsure = False
                return True
            except Exception as err:
                self._unsure = True
                if not _transient(err):
                    self.dropped += 1
                    reason = error_reason(err)
                    logger.warning("MLflow refused a write (%s): %s", write["op"], reason)
                    return True
                if self._closed:
                    return False
                if delay == _RETRY_FIRST_S:
                    logger.warning(
                        "MLflow is unreachable (%s); retrying in the background",
                        error_reason(err),
                    )
                time.sleep(delay)
                delay = min(2 * delay, _RETRY_MAX_S)

    # -- applying one write ------------------------------------------------------------

    def _apply(self, write: dict[str, Any]) -> None:
        op = write["op"]
        if op == "sweep":
            best = write["best_trial"]
            tags = {} if best is None else {BEST_RUN_TAG: self._run_id(best)}
            pareto = [self._run_id(trial) for trial in write.get("pareto_trials", [])]
            for run_id in pareto:
                self._client.set_tag(run_id, PARETO_TAG, "true")
            if pareto:
                tags[PARETO_RUNS_TAG] = ",".join(pareto)
            self._client.log_batch(
                self._parent_run_id,
                metrics=_metrics(write["metrics"], write["time"], 0),
                tags=_tags(tags),
            )
            if write["status"]:
                self._client.set_terminated(self._parent_run_id, write["status"])
            return
        trial = write["trial"]
        if op == "run":
            self._ensure_run(trial, write["tags"], write["params"])
            return
        run_id = self._run_id(trial)
        if run_id is None:
            raise MlflowException(f"no run for trial {trial}", RESOURCE_DOES_NOT_EXIST)
        if op == "epoch":
            step, tags = write["step"], _tags(write.get("tags", {}))
            if step <= self._last_step.get(trial, 0):
                # The run has this epoch (a restarted trial repeats it), but the trial may
                # repeat it on another node: the node tags still apply.
                if tags:
                    self._client.log_batch(run_id, tags=tags)
                return
            metrics = _metrics(write["metrics"], write["time"], step)
            self._client.log_batch(run_id, metrics=metrics, tags=tags)
            self._last_step[trial] = step
        elif op == "end":
            metrics = _metrics(write["metrics"], write["time"], 0)
            self._client.log_batch(run_id, metrics=metrics, tags=_tags(write["tags"]))
            self._client.set_terminated(run_id, write["status"])
        elif op == "artifacts":
            self._client.log_artifacts(run_id, write["path"], write["artifact_path"])
        elif op in self._handlers:
            self._handlers[op](self._client, run_id, write)
        else:
            raise MlflowException(f"unknown write {op!r}", INVALID_PARAMETER_VALUE)

    def _run_id(self, trial: int) -> str | None:
        """The trial's run, looked up once; its last logged epoch comes with it."""
        if trial not in self._run_ids:
            if self._unsure:
                run = find_trial_run(self._client, self._target, trial)
                run_id = None if run is None else run.info.run_id
            else:
                if self._listed is None:
                    runs = trial_runs(self._client, self._target)
                    self._listed = {number: run.info.run_id for number, run in runs.items()}
                run_id = self._listed.get(trial)
            if run_id is None:
                return None
            history = self._client.get_metric_history(run_id, self._step_metric)
            self._last_step[trial] = max((m.step for m in history), default=0)
            self._run_ids[trial] = run_id
        return self._run_ids[trial]

    def _ensure_run(self, trial: int, tags: dict[str, str], params: dict[str, str]) -> None:
        run_id = self._run_id(trial)
        if run_id is None:
            run_id = self._client.create_run(self._experiment_id, tags=tags).info.run_id
            self._run_ids[trial] = run_id
            self._last_step[trial] = 0
        params_list = [Param(key, value) for key, value in params.items()]
        self._client.log_batch(run_id, params=params_list, tags=_tags(tags))
