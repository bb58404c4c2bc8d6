"""``orchestrate ui``: the MLflow UI against the sweeps' tracking store, on 127.0.0.1."""

from __future__ import annotations

import os
import sys

from orchestrator.entities.credentials import mask
from orchestrator.stores.preflight import (
    check_existing_store,
    check_port_free,
    check_tracking_uri,
)
from orchestrator.stores.tracking.runs import resolve_tracking_uri
from trainer.config import ConfigError

__all__ = ["exec_mlflow_ui", "ui_store"]


def ui_store(tracking_uri: str | None, host: str, port: int) -> str:
    """The tracking store the UI will read (a database that exists: MLflow would create an
    empty one; a tracking server has its own UI), once it and the UI's address are checked."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        raise ConfigError(f"{mask(uri)} is a tracking server with a UI of its own: open it")
    check_existing_store(uri, "--tracking-uri", check_tracking_uri)
    check_port_free(host, port)
    return uri


def exec_mlflow_ui(uri: str, host: str, port: int) -> None:
    """Replace this process by ``mlflow ui`` on `uri`; never returns."""
    # One user browsing: one web worker and no job runner (MLflow starts both by default).
    args = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port)]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    # The store URL goes by environment, not argv: `ps` shows argv (and any password in it).
    env["MLFLOW_BACKEND_STORE_URI"] = uri
    os.execve(sys.executable, [*args, "--workers", "1"], env)
