"""What every command shares: one-line input errors (exit status 2) and store outages (exit
status 1), the store options, and plain output lines."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any, NoReturn, TypeVar

import click

from orchestrator.entities.env import STUDY_STORAGE, SWEEP_STORAGE, TRACKING_URI
from orchestrator.entities.errors import ClusterUnavailable, StoreUnavailable
from orchestrator.rendering.console import console
from trainer.config import ConfigError
from trainer.data.errors import DataError

__all__ = [
    "EXIT_INTERRUPTED",
    "Command",
    "Group",
    "InputError",
    "exit_interrupted",
    "fail_on_input_errors",
    "on_interrupt",
    "say",
    "storage_option",
    "stored_urls_options",
    "study_storage_option",
    "tracking_uri_option",
    "verbose_option",
]

F = TypeVar("F", bound=Callable[..., Any])
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class InputError(click.ClickException):
    """Bad user input: one line on stderr, exit status 2, nothing started."""

    exit_code = 2


def _one_line(err: click.UsageError) -> InputError:
    where = f" (see {err.ctx.command_path} -h)" if err.ctx is not None else ""
    return InputError(f"{err.format_message()}{where}")


class Command(click.Command):
    """Usage errors as one line (click would print the usage and a hint around them)."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as err:
            raise _one_line(err) from None


class Group(click.Group):
    """Usage errors as one line; Ctrl-C where no command says more ends with ``interrupted``
    and exit status 130 (click would print "Aborted!" and exit 1)."""

    command_class = Command

    def invoke(self, ctx: click.Context) -> Any:
        with on_interrupt("interrupted"):
            return super().invoke(ctx)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as err:
            raise _one_line(err) from None

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as err:
            raise _one_line(err) from None


def tracking_uri_option(help_text: str) -> Callable[[F], F]:
    return click.option("--tracking-uri", envvar=TRACKING_URI.name, metavar="URI", help=help_text)


def study_storage_option(help_text: str) -> Callable[[F], F]:
    return click.option("--study-storage", envvar=STUDY_STORAGE.name, metavar="URL", help=help_text)


def stored_urls_options(f: F) -> F:
    """--tracking-uri/--study-storage of a recorded sweep: its stores' full URLs, needed
    when they have passwords (sweep.json keeps them masked)."""
    f = tracking_uri_option(
        f"The sweep's tracking URI with its password, if it has one. [env: {TRACKING_URI.name}]"
    )(f)
    return study_storage_option(
        "The sweep's study storage URL with its password, if it has one. "
        f"[env: {STUDY_STORAGE.name}]"
    )(f)


def storage_option(f: F) -> F:
    return click.option(
        "--storage",
        default=SWEEP_STORAGE.default,
        show_default=True,
        envvar=SWEEP_STORAGE.name,
        metavar="PATH",
        help="Directory holding the sweeps (Ray Tune state, Optuna study, sweep.json); "
        f"a path every node can reach on a multi-node cluster. [env: {SWEEP_STORAGE.name}]",
    )(f)


def verbose_option(f: F) -> F:
    return click.option(
        "--verbose",
        is_flag=True,
        help="Print Ray's, MLflow's and Optuna's own messages here instead of the sweep's "
        "log file.",
    )(f)


def say(text: str) -> None:
    """One plain line on the terminal (never wrapped, no markup), also while the libraries'
    output goes to the log file."""
    console.print(text, soft_wrap=True, highlight=False, markup=False)


def exit_interrupted(message: str) -> NoReturn:
    """End the command as Ctrl-C ends it: `message` on one line, exit status 130."""
    say(message)
    sys.exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def on_interrupt(message: str) -> Iterator[None]:
    """Ctrl-C in the block ends the command with :func:`exit_interrupted`."""
    try:
        yield
    except KeyboardInterrupt:
        exit_interrupted(message)


def fail_on_input_errors(fn: F) -> F:
    """Turn ConfigError/DataError raised by a command into exit status 2, and a store whose
    wait ran out (StoreUnavailable) or a local Ray that did not start (ClusterUnavailable)
    into its one line and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError) as err:
            raise InputError(str(err)) from None
        except (ClusterUnavailable, StoreUnavailable) as err:
            raise click.ClickException(str(err)) from None

    return wrapper  # type: ignore[return-value]
