"""``ui`` and ``dashboard``: the MLflow UI and optuna-dashboard, on 127.0.0.1 by default."""

from __future__ import annotations

import click

from orchestrator.cli.options import (
    Command,
    fail_on_input_errors,
    say,
    storage_option,
    stored_urls_options,
    tracking_uri_option,
)
from orchestrator.entities.credentials import mask
from orchestrator.entities.env import TRACKING_URI
from orchestrator.entities.names import LOCAL_HOST

__all__ = ["dashboard", "ui"]


@click.command(cls=Command)
@click.option(
    "--host",
    default=LOCAL_HOST,
    show_default=True,
    metavar="HOST",
    help="Interface to bind; 0.0.0.0 shows every run to anyone who can reach this machine.",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=5000, show_default=True, metavar="PORT"
)
@tracking_uri_option(
    f"The sweeps' tracking store. [default: {TRACKING_URI.default}; env: {TRACKING_URI.name}]"
)
@fail_on_input_errors
def ui(host: str, port: int, tracking_uri: str | None) -> None:
    """The MLflow UI on 127.0.0.1 against the sweeps' tracking store."""
    # Here, not at the top: `orchestrate --help` must not load MLflow.
    from orchestrator.workflows.mlflow_ui import exec_mlflow_ui, ui_store  # noqa: PLC0415

    uri = ui_store(tracking_uri, host, port)
    click.echo(
        f"MLflow UI for {mask(uri)} at http://{host}:{port}/#/experiments?workflowType="
        "machine_learning (the model-training view: runs and charts)"
    )
    exec_mlflow_ui(uri, host, port)


@click.command(cls=Command)
@click.argument("name", metavar="NAME")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8080, show_default=True, metavar="PORT"
)
@storage_option
@stored_urls_options
@fail_on_input_errors
def dashboard(
    name: str, port: int, storage: str, tracking_uri: str | None, study_storage: str | None
) -> None:
    """optuna-dashboard on the sweep's study, on 127.0.0.1."""
    # Here, not at the top: `orchestrate --help` must not load optuna-dashboard.
    from orchestrator.workflows.dashboard import serve, study_page  # noqa: PLC0415
    from orchestrator.workflows.status import open_sweep  # noqa: PLC0415

    record = open_sweep(name, storage, [tracking_uri, study_storage])
    say(f"optuna-dashboard for sweep {name} at {study_page(record, port)} (Ctrl-C stops it)")
    serve(record, port)
