"""Tune callbacks on the sweep driver: MLflow tracking, the sweep report, live progress."""
