"""The sweep report: one self-contained HTML file, built from the stores alone (the Optuna
study and the sweep's MLflow runs), so it works while a sweep runs and after it."""
