"""Finding a sweep's MLflow experiment and runs, and the values every MLflow write needs.

A trial's run is found by its sweep and Optuna trial number (tags ``sweep`` and
``optuna_trial_number``), whichever Tune trial ran it: :func:`find_trial_run` and
:func:`trial_runs` are the one place that lookup is written.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from orchestrator.entities.env import TRACKING_URI
from orchestrator.entities.names import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    SWEEP_TAG,
    TRIAL_NUMBER,
)
from orchestrator.entities.sweep import SweepTarget

__all__ = [
    "ensure_experiment",
    "find_trial_run",
    "flatten",
    "now_ms",
    "resolve_tracking_uri",
    "trial_runs",
]

_PAGE_RUNS = 5000  # runs per search request


def resolve_tracking_uri(uri: str | None) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else the local store under ./mlruns (made absolute,
    so every process of the sweep writes to the same file). Creates nothing."""
    uri = uri or TRACKING_URI.get()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it if needed. A tracking server decides where artifacts
    go; with a database used directly they go to `artifacts/` beside a sqlite file, else to
    ./mlruns/artifacts."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        store_dir = Path(tracking_uri.removeprefix("sqlite:///")).parent
        location = (store_dir / "artifacts" / name).resolve().as_uri()
    elif not tracking_uri.startswith(("http://", "https://")):
        location = (Path("mlruns") / "artifacts" / name).resolve().as_uri()
    # A model-training experiment (runs and charts), not a GenAI one (traces).
    tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
    return client.create_experiment(name, artifact_location=location, tags=tags)


def _trial_filter(sweep: str, number: int | None = None) -> str:
    """The search filter of a sweep's trial runs (or of trial `number`'s run)."""
    query = f"tags.{SWEEP_TAG} = '{sweep}'"
    return query if number is None else f"{query} and tags.{TRIAL_NUMBER} = '{number}'"


def find_trial_run(client: MlflowClient, target: SweepTarget, number: int) -> Run | None:
    """The run of the sweep's trial `number`, if it has one yet."""
    runs = client.search_runs(
        [target.experiment_id], filter_string=_trial_filter(target.name, number), max_results=1
    )
    return runs[0] if runs else None


def trial_runs(client: MlflowClient, target: SweepTarget) -> dict[int, Run]:
    """The sweep's trial runs by Optuna trial number (every page of the search)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [target.experiment_id],
            filter_string=_trial_filter(target.name),
            max_results=_PAGE_RUNS,
            page_token=token,
        )
        runs += page
        token = page.token
        if not token:
            break
    return {
        int(r.data.tags[TRIAL_NUMBER]): r
        for r in runs
        if r.data.tags.get(TRIAL_NUMBER, "None") != "None"
    }


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys (``{"loss": {"kind": "mate"}}`` -> ``{"loss.kind": ...}``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, dotted + ".")
        else:
            flat[dotted] = value
    return flat


def now_ms() -> int:
    return int(time.time() * 1000)
