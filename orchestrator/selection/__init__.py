"""Which trials of a study count: the best, the Pareto set, the failed, whether the sweep has
finished, and the ``promote --pick`` rules. Pure functions of a loaded Optuna study."""
