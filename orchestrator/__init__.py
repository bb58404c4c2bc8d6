"""Everything around trials: spaces, sweeps, cluster, tracking, CLI."""

import os

# Neither MLflow nor Ray phones home from a sweep unless the user opts back in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
