"""The stores a sweep reads and writes: the Optuna study, the MLflow tracking store (through
its journaled writer), and the checks made on both before anything starts."""
