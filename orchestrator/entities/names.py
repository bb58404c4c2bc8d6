"""Names shared by several layers: files in a sweep directory, MLflow tags, Optuna user
attributes and trial-config keys. One place defines each, as MLflow keeps its tag names."""

from __future__ import annotations

__all__ = [
    "APPLIED_FILE",
    "BEST_RUN_TAG",
    "COMPARE_DIR",
    "DRIVER_LOCK_FILE",
    "EPOCHS_ATTR",
    "ERROR",
    "EXPERIMENT_KIND_TAG",
    "JOURNAL_FILE",
    "LOCAL_HOST",
    "LOG_FILE",
    "METRICS_FILE",
    "MODEL_TRAINING_KIND",
    "PARETO_RUNS_TAG",
    "PARETO_TAG",
    "PROMOTED_RUN_TAG",
    "PROMOTED_TRIAL_TAG",
    "PRUNED_TAG",
    "RAY_TRIAL_ID",
    "RECORD_FILE",
    "REPORT_FILE",
    "SPACE_COPY",
    "STUDY_FILE",
    "SWEEP_RUN_TAG",
    "SWEEP_TAG",
    "TRIAL_NUMBER",
]

# -- files in a sweep directory (<storage>/<name>/) ------------------------------------
RECORD_FILE = "sweep.json"  # the SweepRecord
SPACE_COPY = "space.yaml"  # the space file the sweep was launched with
STUDY_FILE = "optuna.db"  # the study, unless a study storage URL is given
REPORT_FILE = "report.html"  # the sweep report, also logged to the parent run
LOG_FILE = "sweep.log"  # Ray's, MLflow's and Optuna's own output
METRICS_FILE = "metrics.json"  # beside checkpoint.pt in the output of `orchestrate train`
JOURNAL_FILE = "tracking-journal.jsonl"  # MLflow writes not yet known to be applied
DRIVER_LOCK_FILE = "driver.lock"  # held by the one process running the sweep
APPLIED_FILE = "tracking-journal.applied"  # how many journal lines are in MLflow
COMPARE_DIR = "compare"  # `compare`'s cached test evaluations, one file per trial

# -- one name for one meaning across Tune, Optuna and MLflow ---------------------------
TRIAL_NUMBER = "optuna_trial_number"  # trial config key and trial run tag: the Optuna number
ERROR = "error"  # a FAIL trial's user attribute and its run's tag: why it failed
RAY_TRIAL_ID = "ray_trial_id"  # user attribute and run tag: the Tune trial that runs it
EPOCHS_ATTR = "epochs"  # user attribute: epochs a multi-objective trial has reported

# -- MLflow run tags ---------------------------------------------------------------------
SWEEP_TAG = "sweep"  # on the parent run and every trial run: the sweep's name
PRUNED_TAG = "pruned"  # "true" on the run of a pruned trial
BEST_RUN_TAG = "best_run_id"  # on the parent run
PARETO_TAG = "pareto"  # on the runs of a multi-objective sweep's Pareto set
PARETO_RUNS_TAG = "pareto_run_ids"  # on the parent run: the Pareto set's runs
PROMOTED_TRIAL_TAG = "promoted_from_trial"  # on a promoted job's run: the trial's number
PROMOTED_RUN_TAG = "promoted_from_run_id"  # on a promoted job's run: the trial's run
SWEEP_RUN_TAG = "sweep_run_id"  # on a promoted job's run: the sweep's parent run
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow UI and its kind selector
MODEL_TRAINING_KIND = "custom_model_development"  # runs and charts, not GenAI traces

LOCAL_HOST = "127.0.0.1"  # every server the project starts listens here only
