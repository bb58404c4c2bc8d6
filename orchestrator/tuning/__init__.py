"""The Ray Tune side of a sweep: the cluster, the Tuner, the Optuna-backed searcher and
scheduler, and the callbacks that record and show the trials."""
