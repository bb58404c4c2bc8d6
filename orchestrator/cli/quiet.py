"""A quiet terminal: the libraries' own output goes to the sweep's log file.

Ray, Ray Tune, MLflow and Optuna log through Python's ``logging`` (Ray's token-auth warning,
"Started a local Ray instance", MLflow's database set-up, Tune's snapshot warnings) and
Tune also ``print``s (its configuration box, the TensorBoard hint). While a sweep runs,
those loggers, ``sys.stdout``/``sys.stderr`` and Python warnings all write to
``<sweep>/sweep.log``; the project's own console keeps the real terminal.

Until the sweep is recorded (the caller calls the ``release`` it is given) the output is
held in memory, so a request refused after joining a cluster (bad input) or a local Ray
that does not start leaves no directory behind; if the command fails for another reason
before then, the held lines are printed on stderr rather than lost.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from orchestrator.entities.errors import ClusterUnavailable
from orchestrator.rendering.console import console
from trainer.config import ConfigError

__all__ = ["library_output_to"]

_LOGGERS = ("", "ray", "mlflow", "optuna", "alembic", "urllib3", "filelock", "py.warnings")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _HeldLogFile(io.TextIOBase):
    """A text stream held in memory until :meth:`release`, then appended to its file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = io.StringIO()
        self._file: io.TextIOWrapper | None = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return (self._file or self.held).write(text)

    def release(self) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8", buffering=1)
            self._file.write(self.held.getvalue())
            self.held = io.StringIO()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


@contextlib.contextmanager
def library_output_to(path: Path, *, verbose: bool = False) -> Iterator[Callable[[], None]]:
    """Send the libraries' log lines, prints and warnings to `path` (unless `verbose`);
    yields ``release``, to call once the sweep is recorded."""
    if verbose:
        yield lambda: None
        return
    stream = _HeldLogFile(path)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(_FORMAT))
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    console.file = sys.stdout  # the project's own output stays on the terminal
    terminal_stderr = sys.stderr
    try:
        with (
            contextlib.redirect_stdout(stream),
            contextlib.redirect_stderr(stream),
            warnings.catch_warnings(),
        ):
            logging.captureWarnings(True)
            yield stream.release
    except (ConfigError, ClusterUnavailable, SystemExit):
        raise  # bad input, Ray's reason for not starting, Ctrl-C's line: one line says it all
    except BaseException:
        terminal_stderr.write(stream.held.getvalue())  # empty once released
        raise
    finally:
        logging.captureWarnings(False)
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        console.file = None  # follows sys.stdout again
        handler.close()
        stream.close()
