"""`orchestrate dashboard`: optuna-dashboard on a sweep's study, bound to 127.0.0.1."""

from __future__ import annotations

import optuna
from optuna_dashboard import run_server

from orchestrator.entities.names import LOCAL_HOST
from orchestrator.entities.sweep import SweepRecord
from orchestrator.stores.preflight import check_port_free

__all__ = ["serve", "study_page"]


def study_page(record: SweepRecord, port: int) -> str:
    """The dashboard's page of the sweep's study, once the port is known to be free."""
    check_port_free(LOCAL_HOST, port)
    storage = optuna.storages.RDBStorage(record.study_storage)
    study_id = storage.get_study_id_from_name(record.name)
    return f"http://{LOCAL_HOST}:{port}/dashboard/studies/{study_id}"


def serve(record: SweepRecord, port: int) -> None:
    """Serve the study's storage on the loopback interface until interrupted."""
    run_server(optuna.storages.RDBStorage(record.study_storage), host=LOCAL_HOST, port=port)
