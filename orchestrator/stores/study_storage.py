"""The Optuna study's RDB storage, patient with a database that is down or restarting.

Optuna's ``RDBStorage`` raises at the first failed connection, and the searcher needs the
study for every decision, so a database restart would end the sweep. :class:`PatientRDBStorage`
repeats each storage call while the database does not answer: it says so once on the
terminal, waits with backoff, says when the database is back, and after
``MATE_STUDY_DB_WAIT_S`` seconds (default 600) gives up, raising
:class:`~orchestrator.entities.errors.StoreUnavailable` (the command line prints its one
line). The outage is one per database in a process: every storage on it (the searcher's, the
callbacks') waits out the same deadline, and once it has passed, fails at once. Pooled
connections are checked before use (``pool_pre_ping``), so a restart between two calls goes
unnoticed.

A call is repeated whole. Reads, and writes that store a value under a key (an epoch's
intermediate value, an attribute, a parameter: Optuna upserts them), can be repeated as they
are. Two writes cannot, when the connection dies after the database committed them but
before it said so: ending a trial (``tell``) is not repeated once the trial has the state it
was to get, and every new trial carries a token (system attribute ``orchestrator:token``) by
which a repeated ``ask`` finds the trial its lost attempt created rather than add a second.

A study in SQLite (the sweep's ``optuna.db``) is written with write-ahead logging
(:mod:`orchestrator.stores.sqlite`).
"""

from __future__ import annotations

import copy
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial, wraps
from typing import Any, TypeVar

import optuna
import sqlalchemy
import sqlalchemy.orm
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

from orchestrator.entities.credentials import mask
from orchestrator.entities.env import STUDY_DB_WAIT
from orchestrator.entities.errors import StoreUnavailable
from orchestrator.rendering.console import console
from orchestrator.stores.preflight import error_reason
from orchestrator.stores.sqlite import write_ahead
from trainer.config import ConfigError

__all__ = ["TOKEN_ATTR", "PatientRDBStorage", "ReadingRDBStorage", "wait_seconds"]

T = TypeVar("T")

TOKEN_ATTR = "orchestrator:token"  # system attribute: which `ask` created the trial
_RETRY_FIRST_S, _RETRY_MAX_S = 0.5, 5.0
_calls = threading.local()  # `depth`: retried calls in progress on this thread
_outages: dict[str, float] = {}  # masked database URL -> when it stopped answering
_outages_lock = threading.Lock()


def wait_seconds() -> float:
    """How long a call waits for the study's database (``MATE_STUDY_DB_WAIT_S``)."""
    text = STUDY_DB_WAIT.get()
    try:
        seconds = float(text)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"{STUDY_DB_WAIT.name} is {text!r}, but must be seconds >= 0")
    return seconds


def _database_error(err: BaseException) -> BaseException | None:
    """The database's own error in `err` (Optuna wraps it in a misleading message)."""
    if isinstance(err, optuna.exceptions.StorageInternalError):
        return err.__cause__
    return err


def unreachable(err: BaseException) -> bool:
    """Whether `err` says the database did not answer (down, restarting, a dropped
    connection, SQLite's lock), rather than refused the call."""
    err = _database_error(err)
    if isinstance(err, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return not isinstance(err.orig, sqlite3.Error) or "locked" in str(err.orig)
    return isinstance(err, sqlalchemy.exc.DBAPIError) and err.connection_invalidated


def _running_trial() -> FrozenTrial:
    """What Optuna stores for a trial asked for: RUNNING from now, nothing else yet."""
    return FrozenTrial(
        number=-1,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.now(),
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={},
        intermediate_values={},
        trial_id=-1,
    )


def _say(text: str) -> None:
    console.print(text, soft_wrap=True, highlight=False, markup=False)


class PatientRDBStorage(optuna.storages.RDBStorage):
    """An ``RDBStorage`` whose calls wait for a database that does not answer (module doc).
    ``optuna.create_study`` and ``load_study`` wrap it in their cache as any RDBStorage."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.wait_s = wait_seconds()
        self.masked_url = mask(url)
        engine_kwargs = dict(kwargs.pop("engine_kwargs", None) or {})
        engine_kwargs.setdefault("pool_pre_ping", True)  # a restart kills pooled connections
        self._patiently(partial(super().__init__, url, engine_kwargs=engine_kwargs, **kwargs))
        write_ahead(self.engine)

    def _patiently(
        self, call: Callable[[], T], took_effect: Callable[[], T | None] | None = None
    ) -> T:
        """`call()`, repeated while the database does not answer; before a repeat,
        `took_effect()` returns what the failed attempt returned if it did commit (else
        None). A call made within another (Optuna's methods call each other) is the outer
        one's to repeat."""
        if getattr(_calls, "depth", 0):
            return call()
        _calls.depth = 1
        try:
            return self._repeat(call, took_effect or (lambda: None))
        finally:
            _calls.depth = 0

    def _repeat(self, call: Callable[[], T], took_effect: Callable[[], T | None]) -> T:
        failed, delay = False, _RETRY_FIRST_S
        while True:
            try:
                result = took_effect() if failed else None
                if result is None:
                    result = call()
            except Exception as err:
                if not unreachable(err):
                    raise
                failed, reason = True, error_reason(_database_error(err))
                waited = self._outage_began(reason)
                if waited >= self.wait_s:  # says the wait allowed: `waited` can be longer
                    raise StoreUnavailable(
                        f"the study's database {self.masked_url} did not answer for "
                        f"{self.wait_s:.0f} s ({reason}); giving up"
                    ) from err
                time.sleep(min(delay, self.wait_s - waited))
                delay = min(2 * delay, _RETRY_MAX_S)
                continue
            self._outage_ended()
            return result

    def _outage_began(self, reason: str) -> float:
        """Seconds since the database stopped answering; the first call to find it so says
        so on the terminal."""
        now = time.monotonic()
        with _outages_lock:
            since = _outages.setdefault(self.masked_url, now)
        if since == now:
            _say(
                f"the study's database {self.masked_url} does not answer ({reason}); "
                f"waiting up to {self.wait_s:.0f} s for it"
            )
        return now - since

    def _outage_ended(self) -> None:
        with _outages_lock:
            since = _outages.pop(self.masked_url, None)
        if since is not None:
            _say(f"the study's database is back after {time.monotonic() - since:.0f} s")

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        """A new trial (`template_trial`'s copy, if given) carrying a fresh token."""
        token = uuid.uuid4().hex
        template = _running_trial() if template_trial is None else copy.deepcopy(template_trial)
        template.system_attrs = {**template.system_attrs, TOKEN_ATTR: token}

        def create() -> FrozenTrial:
            # One attempt: Optuna's own loop would repeat an attempt whose answer was lost.
            if template.state == TrialState.RUNNING:  # it starts when the database has it
                template.datetime_start = datetime.now()
            with _create_scoped_session(self.scoped_session) as session:
                models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                row = self._get_prepared_new_trial(study_id, template, session)
                frozen = copy.deepcopy(template)
                frozen.number, frozen.datetime_start = row.number, row.datetime_start
                frozen._trial_id = row.trial_id
            return frozen

        def created() -> FrozenTrial | None:
            trials = self.get_all_trials(study_id, deepcopy=False)
            return next((t for t in trials if t.system_attrs.get(TOKEN_ATTR) == token), None)

        return self._patiently(create, created)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        def ended_as_asked() -> bool | None:
            return True if self.get_trial(trial_id).state == state else None

        update = partial(super().set_trial_state_values, trial_id, state, values)
        return self._patiently(update, ended_as_asked)


def _patient(method: Callable[..., T]) -> Callable[..., T]:
    @wraps(method)
    def call(self: PatientRDBStorage, *args: Any, **kwargs: Any) -> T:
        return self._patiently(partial(method, self, *args, **kwargs))

    return call


# Every other RDBStorage method that talks to the database, as Optuna's Study and storage
# cache call them (`create_new_trial`, `set_trial_param` and `get_all_trials` go through the
# private ones).
for _name in (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "_set_trial_param",
    "get_trial_param",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "_get_trials",
    "_get_best_trial_id",
    "record_heartbeat",
    "_get_stale_trial_ids",
):
    setattr(PatientRDBStorage, _name, _patient(getattr(optuna.storages.RDBStorage, _name)))


class ReadingRDBStorage(PatientRDBStorage):
    """A :class:`PatientRDBStorage` of studies that exist: their tables were made and their
    schema checked when the sweep created its study, so it connects without doing either.

    Optuna's constructor always builds a schema version manager, which imports and configures
    Alembic even when told to skip the check (a quarter of a second of ``orchestrate
    status``). This one sets what that constructor sets before that step and no version
    manager, so it cannot upgrade the schema or report its version; unpickled, it is an
    ``RDBStorage`` with its version manager again.
    """

    def __init__(self, url: str) -> None:
        self.wait_s = wait_seconds()
        self.masked_url = mask(url)
        self.url = self._fill_storage_url_template(url)
        self.engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
        self._set_default_engine_kwargs_for_mysql(url, self.engine_kwargs)
        self.skip_compatibility_check = True
        self.heartbeat_interval = self.grace_period = None
        self.heartbeat_stale_trial_callback = self.failed_trial_callback = None
        self.engine = sqlalchemy.create_engine(self.url, **self.engine_kwargs)
        self.scoped_session = sqlalchemy.orm.scoped_session(
            sqlalchemy.orm.sessionmaker(bind=self.engine)
        )
        self._version_manager = None
