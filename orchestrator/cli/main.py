"""The ``orchestrate`` group: every command, and what holds for all of them."""

from __future__ import annotations

import atexit
import gc
import os

import click

from orchestrator.cli.jobs import train, validate
from orchestrator.cli.options import Group
from orchestrator.cli.servers import dashboard, ui
from orchestrator.cli.sweeps import compare, launch, promote, report, resume, status

__all__ = ["main"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mate-orchestrator")
def main() -> None:
    """Hyperparameter search and experiment orchestration for multi-exit self-distillation."""
    # MLflow prints a link for every run it ends, made of the tracking URI (and any password
    # in it); the commands print their own summaries.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # At exit, Python's last garbage collection walks every object the imports made: a fifth
    # of a second of a read-only command. Frozen objects are left to the process's end.
    atexit.register(gc.freeze)


_COMMANDS = (train, validate, launch, resume, status, promote, ui, report, compare, dashboard)
for _command in _COMMANDS:
    main.add_command(_command)
