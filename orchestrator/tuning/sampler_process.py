"""Optuna's sampler in a process of its own, so that asking costs Tune's driver no CPU.

TPE's ask reads every trial of the study, so its cost grows with the study: at 2,000 trials
it took 21 ms of CPU alone and 57-73 ms on a busy driver, against the 62 ms per trial that
sixteen one-second trials leave Tune's loop. Asking on a thread of the driver hid the wait
but not the CPU: the thread holds the interpreter lock that Tune's loop needs.

:class:`SamplerProcess` keeps a mirror of the study in a child process: an in-memory study
with the sweep's sampler (same kind, seed and settings), loaded with the study's trials when
the child starts. The driver sends it each trial's end (state, values, intermediate values)
and asks it for the next trial; the child samples define-by-run
(:func:`~orchestrator.stores.study.suggest_params`), tells itself FAIL for configurations no
job config accepts and asks again, and returns the trial's parameters and system attributes
(a sampler's own bookkeeping, such as the grid's cell) with the refused ones. The driver
writes them to the real study (:meth:`SamplerProcess.ask` returns them as Optuna trial
templates), so the study in storage is the same as when the driver asked, and a restarted
driver's child starts from it. The pruner stays on the driver: it decides per epoch, from the
driver's study.

Messages travel in order on one pipe: a trial's end is in the mirror before any later ask.
The mirror never holds WAITING trials (nothing in a sweep enqueues them).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from orchestrator.entities.names import ERROR
from orchestrator.entities.space import SpaceSpec, decode_params
from orchestrator.stores.study import make_sampler, suggest_params
from trainer.config import ConfigError

__all__ = ["Asked", "SamplerProcess"]

MAX_INVALID_ASKS = 100


@dataclass(frozen=True)
class Asked:
    """A trial the mirror asked for: `trial`, RUNNING, to create in the real study (its
    parameters and system attributes), and `refused`, FAIL trials (with why in the user
    attribute ``error``) it asked for before, whose configurations no job config accepts."""

    mirror_id: int
    trial: FrozenTrial
    refused: list[FrozenTrial]


class SamplerProcess:
    """The driver's end of the mirror (module doc). :meth:`ask` is for one thread at a time;
    :meth:`finish` may be called from any thread."""

    def __init__(self, spec: SpaceSpec, trials: Sequence[FrozenTrial]) -> None:
        """Start the child and load it with `trials`, the study's trials so far."""
        context = multiprocessing.get_context("spawn")  # the driver runs Ray's threads
        self._conn, child_end = context.Pipe()
        self._send_lock = threading.Lock()
        self._process = context.Process(
            target=_serve, args=(spec, child_end), name="optuna-sampler", daemon=True
        )
        self._process.start()
        child_end.close()
        self._send(("load", [t for t in trials if t.state != TrialState.WAITING]))

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:
            raise self._ended() from None

    def _ended(self) -> RuntimeError:
        return RuntimeError(
            f"the Optuna sampler process ended (exit code {self._process.exitcode})"
        )

    def ask(self) -> Asked:
        """The next trial to run; raises ConfigError when no configuration was valid in
        :data:`MAX_INVALID_ASKS` asks."""
        self._send(("ask",))
        try:
            kind, *reply = self._conn.recv()
        except EOFError:
            raise self._ended() from None
        if kind == "invalid":
            raise ConfigError(reply[0])
        if kind == "error":
            raise RuntimeError(f"the Optuna sampler failed:\n{reply[0]}")
        return Asked(*reply)

    def bind(self, mirror_id: int, trial_id: int) -> None:
        """Record that the mirror's trial `mirror_id` is the real study's `trial_id`."""
        self._send(("bind", mirror_id, trial_id))

    def finish(self, trial: FrozenTrial) -> None:
        """Tell the mirror how the real study's `trial` ended."""
        ended = (trial.state, trial.values, trial.intermediate_values)
        self._send(("finish", trial._trial_id, *ended))

    def close(self) -> None:
        """Stop the child (it ends when its pipe closes)."""
        with self._send_lock:
            self._conn.close()
        self._process.join()


def _serve(spec: SpaceSpec, conn: multiprocessing.connection.Connection) -> None:
    """The child: keep the mirror and answer asks until the driver closes its end."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mirror = _Mirror(spec)
    while True:
        try:
            op, *args = conn.recv()
        except EOFError:
            return
        if op == "ask":
            conn.send(mirror.ask())
        else:
            getattr(mirror, op)(*args)


class _Mirror:
    """The in-memory copy of the study, in the child; trials known by the real study's ids."""

    def __init__(self, spec: SpaceSpec) -> None:
        self._spec = spec
        self._study = optuna.create_study(
            directions=["maximize" if mode == "max" else "minimize" for mode in spec.search.modes],
            sampler=make_sampler(spec),
        )
        self._storage = self._study._storage
        self._ids: dict[int, int] = {}  # the real study's trial id -> the mirror's

    def load(self, trials: list[FrozenTrial]) -> None:
        for trial in trials:
            self.bind(self._storage.create_new_trial(self._study._study_id, trial), trial._trial_id)

    def bind(self, mirror_id: int, trial_id: int) -> None:
        self._ids[trial_id] = mirror_id

    def finish(
        self,
        trial_id: int,
        state: TrialState,
        values: list[float] | None,
        intermediate_values: dict[int, float],
    ) -> None:
        mirror_id = self._ids.get(trial_id)
        if mirror_id is None or self._storage.get_trial(mirror_id).state.is_finished():
            return
        for step, value in intermediate_values.items():
            self._storage.set_trial_intermediate_value(mirror_id, step, value)
        self._storage.set_trial_state_values(mirror_id, state, values)

    def ask(self) -> tuple[Any, ...]:
        """("trial", mirror id, trial, refused), ("invalid", why) or ("error", traceback)."""
        try:
            refused = []
            for _ in range(MAX_INVALID_ASKS):
                trial = self._study.ask()
                overrides = decode_params(self._spec, suggest_params(self._spec, trial))
                try:
                    self._spec.job_for(overrides)
                except ConfigError as err:  # a combination no job config accepts
                    trial.set_user_attr(ERROR, f"never ran: {err}")
                    self._study.tell(trial, state=TrialState.FAIL)
                    refused.append(self._storage.get_trial(trial._trial_id))
                    continue
                return ("trial", trial._trial_id, self._storage.get_trial(trial._trial_id), refused)
            why = f"{self._spec.source}: no valid configuration in {MAX_INVALID_ASKS} asks"
            return ("invalid", why)
        except Exception:  # the driver raises it, with this traceback
            return ("error", traceback.format_exc())
