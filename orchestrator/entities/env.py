"""Environment variables the project reads, with their defaults, and those it sets for the
libraries. One place, as MLflow keeps its own."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "LIBRARY_DEFAULTS",
    "RAY_ADDRESS",
    "STUDY_DB_WAIT",
    "STUDY_STORAGE",
    "SWEEP_STORAGE",
    "TRACKING_URI",
    "EnvVar",
    "set_library_defaults",
]


@dataclass(frozen=True)
class EnvVar:
    """An environment variable and the value used when it is unset (None: no default)."""

    name: str
    default: str | None = None

    def get(self) -> str | None:
        """Its value, or the default when it is unset or empty."""
        return os.environ.get(self.name) or self.default


TRACKING_URI = EnvVar("MLFLOW_TRACKING_URI", "sqlite:///mlruns/mlflow.db")
STUDY_STORAGE = EnvVar("MATE_STUDY_STORAGE")  # unset: optuna.db in the sweep directory
# Seconds a sweep waits for its study's database to answer again before it gives up.
STUDY_DB_WAIT = EnvVar("MATE_STUDY_DB_WAIT_S", "600")
SWEEP_STORAGE = EnvVar("MATE_SWEEP_STORAGE", "sweeps")
RAY_ADDRESS = EnvVar("RAY_ADDRESS")  # unset: a local Ray on 127.0.0.1

# Neither MLflow nor Ray phones home from a sweep unless the user opts back in.
LIBRARY_DEFAULTS = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}


def set_library_defaults() -> None:
    """Set :data:`LIBRARY_DEFAULTS` in this process, except those the user has set."""
    for name, value in LIBRARY_DEFAULTS.items():
        os.environ.setdefault(name, value)
