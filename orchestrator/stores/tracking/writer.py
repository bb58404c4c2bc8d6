"""A sweep's MLflow writes: journaled, applied in order by a process of their own, retried.

Tune calls the tracking callback on its driver loop, between scheduling decisions, so a
slow or unreachable tracking server must not block it. :meth:`MlflowWriter.submit` appends
the write to a journal file in the sweep directory and returns; a child process applies the
journal in order, retrying while the store is unreachable, and records how far it got. A
driver killed with writes still pending leaves them in the journal (the child stops when
the driver's end of their pipe closes), and the next writer on that sweep (``orchestrate
resume``) applies them first.

The writes are applied in a process, not on a thread of the driver: MLflow's store client
and figure drawing are Python work, and a sweep of one-second trials spent as much time in
them as Tune's loop itself, which they held up through the interpreter lock. The child's
log records come back to the driver's loggers (the sweep's log file, or the terminal).

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
import logging.handlers
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
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

Handlers = Mapping[str, Callable[[MlflowClient, str, dict[str, Any]], None]]

_RETRY_FIRST_S, _RETRY_MAX_S = 0.5, 5.0
_POLL_S = 0.02  # how often `flush` looks at the child's progress
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


def _complete_lines(journal: Path) -> list[str]:
    """The journal's lines; a torn last line (a kill mid-write) is cut off the file."""
    if not journal.exists():
        return []
    text = journal.read_text()
    complete = text[: text.rfind("\n") + 1]
    if complete != text:
        journal.write_text(complete)
    return complete.splitlines()


def _read_applied(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


class _ToDriverLoggers(logging.Handler):
    """Hands a record from the child to the driver's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        driver = logging.getLogger(record.name)
        if driver.isEnabledFor(record.levelno):
            driver.handle(record)


class MlflowWriter:
    """Applies one sweep's writes: trial runs (children of the sweep's parent run, found by
    Optuna trial number) and the parent run's summary.

    Writes are dicts with an ``op``:
    ``run`` (trial, tags, params): find or create the trial's run; ``epoch`` (trial, step,
    time, metrics, optional tags); ``end`` (trial, status, metrics, tags); ``artifacts`` (trial,
    path, artifact_path); ``sweep`` (metrics, best_trial, pareto_trials, status or None) for
    the parent run. `handlers` apply further ops to a trial's run: ``handlers[op](client,
    run_id, write)``, for instance drawing figures once the trial's epochs are in; they run
    in the child process (module-level functions).
    """

    def __init__(
        self, target: SweepTarget, *, step_metric: str, handlers: Handlers | None = None
    ) -> None:
        self._journal = Path(target.directory) / JOURNAL_FILE
        self._applied_file = Path(target.directory) / APPLIED_FILE
        self._submitted = len(_complete_lines(self._journal))
        context = multiprocessing.get_context("spawn")  # the driver runs Ray's threads
        self._applied = context.Value("q", min(_read_applied(self._applied_file), self._submitted))
        self._dropped = context.Value("q", 0)
        logs = context.Queue()
        self._logs = logging.handlers.QueueListener(logs, _ToDriverLoggers())
        self._logs.start()
        wake, self._wake = context.Pipe(duplex=False)
        self._lock = threading.Lock()
        self._file = self._journal.open("a")
        shared = (self._applied, self._dropped, logs, wake)
        self._process = context.Process(
            target=_apply_journal,
            args=(target, step_metric, dict(handlers or {}), *shared),
            name="mlflow-writer",
            daemon=True,
        )
        self._process.start()
        wake.close()

    @property
    def pending(self) -> int:
        """Writes submitted but not yet applied."""
        return self._submitted - self._applied.value

    @property
    def dropped(self) -> int:
        """Writes MLflow refused for good (logged as warnings)."""
        return self._dropped.value

    def submit(self, write: dict[str, Any]) -> None:
        """Journal `write` and wake the child; returns at once."""
        line = json.dumps(write)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            self._submitted += 1
            self._wake.send_bytes(b"")

    def flush(self, timeout: float, poll_s: float = _POLL_S) -> int:
        """Wait up to `timeout` seconds for every write to be applied, looking every `poll_s`
        seconds; returns how many are still pending."""
        deadline = time.monotonic() + timeout
        while self.pending and self._process.is_alive() and time.monotonic() < deadline:
            time.sleep(poll_s)
        return self.pending

    def close(self, timeout: float) -> int:
        """:meth:`flush`, then stop the child (after the write it is applying); returns how
        many writes are still pending (kept in the journal for the next writer). An emptied
        journal is removed."""
        self.flush(timeout)
        with self._lock:
            self._wake.close()
            self._file.close()
        self._process.join()
        self._logs.stop()
        left = self.pending
        if not left:  # the count first: a journal without it is only applied again
            self._applied_file.unlink(missing_ok=True)
            self._journal.unlink(missing_ok=True)
        return left


def _apply_journal(
    target: SweepTarget,
    step_metric: str,
    handlers: Handlers,
    applied: Any,  # multiprocessing.Value("q"): journal lines applied
    dropped: Any,  # multiprocessing.Value("q"): writes MLflow refused
    logs: Any,  # multiprocessing.Queue of log records for the driver
    wake: multiprocessing.connection.Connection,
) -> None:
    """The child: apply the journal's lines from `applied` on, in order, as they come; stop
    when the driver's end of `wake` closes."""
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(logs)]
    root.setLevel(logging.INFO)
    applier = _Applier(
        target, step_metric, handlers, stopped_within=lambda s: _closed_within(wake, s)
    )
    journal = Path(target.directory) / JOURNAL_FILE
    applied_file = Path(target.directory) / APPLIED_FILE
    with journal.open() as lines:
        for _ in range(applied.value):
            lines.readline()
        partial = ""
        while True:
            line = partial + lines.readline()
            if line.endswith("\n"):
                partial = ""
                write = json.loads(line)
                if not applier.apply_with_retries(write):
                    return  # closed while the store was down: the journal keeps the rest
                dropped.value = applier.dropped
                applied.value += 1
                applied_file.write_text(f"{applied.value}\n")
                continue
            partial = line  # the driver is still writing it, or nothing is new
            if _closed(wake, wait=None):
                return


def _closed_within(wake: multiprocessing.connection.Connection, seconds: float) -> bool:
    """Whether the driver closes its end within `seconds` (returns as soon as it does);
    what it sends meanwhile is taken."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if _closed(wake, wait=left):
            return True
    return _closed(wake)


def _closed(wake: multiprocessing.connection.Connection, wait: float | None = 0.0) -> bool:
    """Whether the driver has closed its end, after waiting up to `wait` seconds (None:
    until it sends or closes) and taking what it sent."""
    try:
        if wake.poll(wait):
            wake.recv_bytes()
        return False
    except (EOFError, OSError):
        return True


class _Applier:
    """Applies writes to MLflow, in the child process."""

    def __init__(
        self,
        target: SweepTarget,
        step_metric: str,
        handlers: Handlers,
        stopped_within: Callable[[float], bool],
    ) -> None:
        # MLflow's HTTP client retries a request for minutes by default; this process retries
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
        self._stopped_within = stopped_within  # waits up to its seconds for the driver to close
        self._run_ids: dict[int, str] = {}
        self._last_step: dict[int, int] = {}
        self._listed: dict[int, str] | None = None  # runs there when first needed, by trial
        self._unsure = False  # the last attempt failed: MLflow may have applied it
        self.dropped = 0

    def apply_with_retries(self, write: dict[str, Any]) -> bool:
        """Apply `write`, retrying transient failures; False when stopped meanwhile."""
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
                if delay == _RETRY_FIRST_S:
                    logger.warning(
                        "MLflow is unreachable (%s); retrying in the background",
                        error_reason(err),
                    )
                if self._stopped_within(delay):  # the driver closed: stop now, not after
                    return False
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
