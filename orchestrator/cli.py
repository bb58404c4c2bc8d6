"""The `orchestrate` command line (DESIGN §6).

Bad input ends with one line naming the problem and exit status 2, before Ray starts or
anything is recorded; that includes click's own usage errors (a bad flag, a missing
argument). Store URLs are printed with their passwords masked. Heavy imports (torch, Ray,
MLflow) happen inside the commands.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from orchestrator.credentials import mask
from trainer.config import ConfigError, load_job_config, parse_job_file, read_yaml

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])
EXIT_INTERRUPTED = 130


class InputError(click.ClickException):
    """Bad user input: one line on stderr, exit status 2, nothing started."""

    exit_code = 2


def _one_line(err: click.UsageError) -> InputError:
    where = f" (see {err.ctx.command_path} -h)" if err.ctx is not None else ""
    return InputError(f"{err.format_message()}{where}")


class _Command(click.Command):
    """Usage errors as one line (click would print the usage and a hint around them)."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as err:
            raise _one_line(err) from None


class _Group(click.Group):
    command_class = _Command

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as err:
            raise _one_line(err) from None

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as err:
            raise _one_line(err) from None


def _tracking_uri_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--tracking-uri", envvar="MLFLOW_TRACKING_URI", metavar="URI", help=help_text
    )


def _study_storage_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--study-storage", envvar="MATE_STUDY_STORAGE", metavar="URL", help=help_text
    )


def _stored_urls_options(f: F) -> F:
    """--tracking-uri/--study-storage of a recorded sweep: its stores' full URLs, needed
    when they have passwords (sweep.json keeps them masked)."""
    f = _tracking_uri_option(
        "The sweep's tracking URI with its password, if it has one. [env: MLFLOW_TRACKING_URI]"
    )(f)
    return _study_storage_option(
        "The sweep's study storage URL with its password, if it has one. [env: MATE_STUDY_STORAGE]"
    )(f)


def _storage_option(f: F) -> F:
    return click.option(
        "--storage",
        default="sweeps",
        show_default=True,
        envvar="MATE_SWEEP_STORAGE",
        metavar="PATH",
        help="Directory holding the sweeps (Ray Tune state, Optuna study, sweep.json); "
        "a path every node can reach on a multi-node cluster. [env: MATE_SWEEP_STORAGE]",
    )(f)


def _verbose_option(f: F) -> F:
    return click.option(
        "--verbose",
        is_flag=True,
        help="Print Ray's, MLflow's and Optuna's own messages here instead of the sweep's "
        "log file.",
    )(f)


def _say(text: str) -> None:
    """One plain line on the terminal (never wrapped, no markup), also while the libraries'
    output goes to the log file."""
    from orchestrator.console import console

    console.print(text, soft_wrap=True, highlight=False, markup=False)


def _fail_on_input_errors(fn: F) -> F:
    """Turn ConfigError/DataError raised by a command into exit status 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from trainer.data import DataError  # imports torch: not at CLI start-up

        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError) as err:
            raise InputError(str(err)) from None

    return wrapper  # type: ignore[return-value]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mate-orchestrator")
def main() -> None:
    """Hyperparameter search and experiment orchestration for multi-exit self-distillation."""
    # MLflow prints a link for every run it ends, made of the tracking URI (and any password
    # in it); the commands print their own summaries.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@main.command()
@click.option("--config", "config_path", required=True, metavar="FILE", help="Job config (YAML).")
@click.option(
    "--output",
    metavar="DIR",
    default=None,
    help="Where metrics.json and checkpoint.pt go. [default: outputs/<config name>]",
)
@_fail_on_input_errors
def train(config_path: str, output: str | None) -> None:
    """Run one training job, without Ray."""
    from orchestrator.console import console, epoch_progress, exit_table
    from trainer.engine import build_job, fit, model_metrics, save_checkpoint

    cfg = load_job_config(config_path)
    out_dir = Path(output or Path("outputs") / Path(config_path).stem)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output is {str(out_dir)!r}, but that is not a directory")
    job = build_job(cfg)
    console.print(
        f"[bold]{cfg.loss.kind}[/] on {cfg.dataset.name}: {cfg.model.arch}, exits "
        f"{cfg.model.exits}, {cfg.train.epochs} epochs on {job.device}"
    )
    with epoch_progress(cfg.train.epochs, job.epoch, cfg.num_exits) as show:
        final = fit(job, on_epoch=show) | model_metrics(job)
    save_checkpoint(job, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
    console.print(exit_table(final, cfg.num_exits, title=f"{config_path} after {job.epoch} epochs"))
    console.print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'checkpoint.pt'}")


@main.command()
@click.argument("file", metavar="FILE")
@_fail_on_input_errors
def validate(file: str) -> None:
    """Check a space file or a job config without running anything."""
    from orchestrator.space import is_space_file, parse_space

    data = read_yaml(file)
    if is_space_file(data):
        spec = parse_space(data, source=file)
        click.echo(
            f"{file}: valid space file ({len(spec.space)} searched keys, "
            f"{spec.search.num_samples} trials, {spec.search.objectives_text})"
        )
        return
    cfg = parse_job_file(data, source=file)
    click.echo(
        f"{file}: valid job config ({cfg.loss.kind}, {cfg.model.arch} with exits "
        f"{cfg.model.exits}, {cfg.dataset.name})"
    )


@main.command()
@click.option("--space", "space_file", required=True, metavar="FILE", help="Search space (YAML).")
@click.option(
    "--gpus",
    type=int,
    default=None,
    metavar="N",
    help="GPUs the sweep may use; 0 runs trials on CPUs. [default: all GPUs present]",
)
@click.option(
    "--address",
    envvar="RAY_ADDRESS",
    metavar="ADDR",
    help="Join this Ray cluster instead of starting a local one. [env: RAY_ADDRESS]",
)
@click.option("--num-samples", type=int, metavar="N", help="Trials to run. [default: the space's]")
@click.option("--name", metavar="NAME", help="Sweep name. [default: <space name>-<timestamp>]")
@_tracking_uri_option(
    "MLflow tracking URI. [default: sqlite:///mlruns/mlflow.db; env: MLFLOW_TRACKING_URI]"
)
@_storage_option
@_study_storage_option(
    "Optuna RDB storage URL, e.g. postgresql://host/db. "
    "[default: sqlite file in the sweep directory; env: MATE_STUDY_STORAGE]"
)
@click.option(
    "--max-concurrent", type=int, metavar="N", help="Trials at once. [default: as resources allow]"
)
@_verbose_option
@_fail_on_input_errors
def launch(
    space_file: str,
    gpus: int | None,
    address: str | None,
    num_samples: int | None,
    name: str | None,
    tracking_uri: str | None,
    storage: str,
    study_storage: str | None,
    max_concurrent: int | None,
    verbose: bool,
) -> None:
    """Run a hyperparameter sweep: Optuna proposes and prunes, Ray runs, MLflow records."""
    from orchestrator import sweep
    from orchestrator.progress import SweepProgress
    from orchestrator.quiet import LOG_FILE, library_output_to
    from orchestrator.space import load_space, pruner_note

    spec = load_space(space_file)
    name = name or sweep.sweep_name_for(space_file)
    log_path = Path(storage).resolve() / name / LOG_FILE
    with library_output_to(log_path, verbose=verbose) as release_log:
        record = sweep.prepare(
            spec,
            name=name,
            storage_path=storage,
            tracking_uri=tracking_uri,
            study_storage=study_storage,
            gpus=gpus,
            address=address,
            num_samples=num_samples,
            max_concurrent=max_concurrent,
        )
        release_log()  # the request is sound: from here on the sweep has a directory
        _say(
            f"sweep {record.name}: {record.num_samples} trials of {spec.source} on "
            f"{record.address or 'a local Ray (127.0.0.1)'}, {record.gpus} GPU(s); "
            f"tracking {mask(record.tracking_uri)}"
        )
        if spec.search.multi_objective:
            _say(f"objectives: {spec.search.objectives_text}")
        if (note := pruner_note(spec)) is not None:
            _say(note)
        _say_log_path(log_path, verbose)
        progress = SweepProgress(
            record.num_samples, spec.max_epochs, (record.study_storage, record.name)
        )
        sweep.launch(spec, record, [progress])
        _finish(record)


@main.command()
@click.argument("name", metavar="NAME")
@_storage_option
@_verbose_option
@_stored_urls_options
@_fail_on_input_errors
def resume(
    name: str, storage: str, verbose: bool, tracking_uri: str | None, study_storage: str | None
) -> None:
    """Continue an interrupted sweep (after Ctrl-C, or a killed `launch`)."""
    from orchestrator import sweep
    from orchestrator.quiet import LOG_FILE, library_output_to

    record = sweep.SweepRecord.load(name, storage, [tracking_uri, study_storage])
    with library_output_to(record.directory / LOG_FILE, verbose=verbose) as release_log:
        release_log()
        _say(f"resuming sweep {name} from {record.directory}")
        _say_log_path(record.directory / LOG_FILE, verbose)
        if sweep.resume(record) is None:
            _say(f"sweep {name} had finished; its MLflow record is complete")
        _finish(record)


def _say_log_path(path: Path, verbose: bool) -> None:
    if not verbose:
        _say(f"log: {path} (Ray, MLflow and Optuna messages; --verbose prints them here)")


def _finish(record) -> None:
    """Top-5 table, the report and the next commands; exit 130 when interrupted."""
    from orchestrator.console import console
    from orchestrator.html_report import REPORT_FILE
    from orchestrator.report import load_study, state_counts, trials_table

    record = record.load(record.name, record.storage_path)  # with the run ids launch set
    study = load_study(record)
    spec = record.spec()
    console.print(trials_table(study, spec.search.metric, limit=5, title=f"top 5 of {record.name}"))
    counts = state_counts(study)
    unfinished = len(study.trials) < record.num_samples or counts.get("RUNNING", 0) > 0
    if unfinished:
        _say(f"interrupted: continue with  orchestrate resume {record.name}")
        sys.exit(EXIT_INTERRUPTED)
    if (record.directory / REPORT_FILE).is_file():
        _say(f"report: {record.directory / REPORT_FILE}")
    _say(
        "next:\n"
        f"  orchestrate status {record.name}\n"
        f"  orchestrate ui          # then {_runs_url(record.experiment_id)}\n"
        f"  orchestrate promote {record.name} --register {record.name.split('-')[0]}"
    )


def _runs_url(experiment_id: str, port: int = 5000) -> str:
    """The MLflow UI's runs page of an experiment, in its model-training view."""
    return (
        f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    )


@main.command()
@click.argument("name", required=False, metavar="NAME")
@_storage_option
@_stored_urls_options
@_fail_on_input_errors
def status(
    name: str | None, storage: str, tracking_uri: str | None, study_storage: str | None
) -> None:
    """Trials, states and best so far of a sweep (or a list of all sweeps)."""
    from orchestrator.console import console
    from orchestrator.report import (
        best_summary,
        failures,
        load_study,
        state_counts,
        sweeps_table,
        trials_table,
    )
    from orchestrator.sweep import SweepRecord, check_stores

    full_urls = [tracking_uri, study_storage]
    if name is None:
        console.print(sweeps_table(storage, full_urls))
        return
    record = SweepRecord.load(name, storage, full_urls)
    check_stores(record)
    spec = record.spec()
    study = load_study(record)
    console.print(trials_table(study, spec.search.metric, title=f"sweep {name}"))
    for number, reason in failures(study):
        console.print(f"trial {number} failed: {reason}", markup=False, soft_wrap=True)
    counts = " ".join(f"{k.lower()} {v}" for k, v in sorted(state_counts(study).items()))
    _say(f"{len(study.trials)}/{record.num_samples} trials ({counts}); {best_summary(study)}")
    _say(f"MLflow: {mask(record.tracking_uri)}, parent run {record.parent_run_id}")


@main.command()
@click.argument("name", metavar="NAME")
@click.option("--epochs", type=int, metavar="N", help="Final schedule. [default: base config's]")
@click.option("--register", metavar="MODEL_NAME", help="Register the model; alias `champion`.")
@click.option(
    "--pick",
    default="best",
    show_default=True,
    metavar="RULE",
    help="Which finished trial: best (on the first objective), trial=N, or a bound on one "
    "objective such as 'val/anytime_gflops<=0.002' (then the best on the first other one).",
)
@_storage_option
@_stored_urls_options
@_fail_on_input_errors
def promote(
    name: str,
    epochs: int | None,
    register: str | None,
    pick: str,
    storage: str,
    tracking_uri: str | None,
    study_storage: str | None,
) -> None:
    """Retrain a finished trial (the best, or the one --pick chooses) on train+val and
    report test metrics."""
    from orchestrator import promote as promotion
    from orchestrator.console import console, epoch_progress, exit_table
    from orchestrator.pick import parse_pick
    from orchestrator.sweep import SweepRecord, check_stores

    record = SweepRecord.load(name, storage, [tracking_uri, study_storage])
    check_stores(record)
    search = record.spec().search
    rule = parse_pick(pick, search)
    cfg, number = promotion.final_job_config(record, epochs, rule)
    _say(
        f"promoting trial {number} of {name} ({rule.describe(search)}): "
        f"{cfg.train.epochs} epochs on train+val"
    )
    with epoch_progress(cfg.train.epochs, 0, cfg.num_exits) as show:
        result = promotion.promote(record, cfg, number, register=register, on_epoch=show)
    console.print(exit_table(result.metrics, cfg.num_exits, title=f"{name}: final job (test)"))
    console.print(f"MLflow run {result.run_id}")
    if result.model_name:
        console.print(
            f"registered {result.model_name} version {result.model_version} as "
            f"@{promotion.CHAMPION_ALIAS}: models:/{result.model_name}@{promotion.CHAMPION_ALIAS}"
        )


@main.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    metavar="HOST",
    help="Interface to bind; 0.0.0.0 shows every run to anyone who can reach this machine.",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=5000, show_default=True, metavar="PORT"
)
@_tracking_uri_option(
    "The sweeps' tracking store. [default: sqlite:///mlruns/mlflow.db; env: MLFLOW_TRACKING_URI]"
)
@_fail_on_input_errors
def ui(host: str, port: int, tracking_uri: str | None) -> None:
    """The MLflow UI on 127.0.0.1 against the sweeps' tracking store."""
    from orchestrator.preflight import check_tracking_uri
    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        raise ConfigError(f"{mask(uri)} is a tracking server with a UI of its own: open it")
    check_tracking_uri(uri)
    click.echo(
        f"MLflow UI for {mask(uri)} at http://{host}:{port}/#/experiments?workflowType="
        "machine_learning (the model-training view: runs and charts)"
    )
    # One user browsing: one web worker and no job runner (MLflow starts both by default).
    args = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port)]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    # The store URL goes by environment, not argv: `ps` shows argv (and any password in it).
    env["MLFLOW_BACKEND_STORE_URI"] = uri
    os.execve(sys.executable, [*args, "--workers", "1"], env)


@main.command()
@click.argument("name", metavar="NAME")
@click.option(
    "--output",
    metavar="DIR",
    default=None,
    help="Where report.html goes. [default: the sweep's directory]",
)
@_storage_option
@_stored_urls_options
@_fail_on_input_errors
def report(
    name: str, output: str | None, storage: str, tracking_uri: str | None, study_storage: str | None
) -> None:
    """Write the sweep's HTML report (plots from the stores; works while it runs) and log it
    to the sweep's MLflow run."""
    from orchestrator.html_report import log_report, write_report
    from orchestrator.sweep import SweepRecord, check_stores

    record = SweepRecord.load(name, storage, [tracking_uri, study_storage])
    check_stores(record)
    path = write_report(record, output or record.directory)
    log_report(record, path)
    _say(f"wrote {path} (also logged to MLflow run {record.parent_run_id})")


@main.command()
@click.argument("name", metavar="NAME")
@click.option("--port", type=int, default=8080, show_default=True, metavar="PORT")
@_storage_option
@_stored_urls_options
@_fail_on_input_errors
def dashboard(
    name: str, port: int, storage: str, tracking_uri: str | None, study_storage: str | None
) -> None:
    """optuna-dashboard on the sweep's study, on 127.0.0.1."""
    from orchestrator.dashboard import serve, study_url
    from orchestrator.sweep import SweepRecord, check_stores

    record = SweepRecord.load(name, storage, [tracking_uri, study_storage])
    check_stores(record)
    _say(f"optuna-dashboard for sweep {name} at {study_url(record, port)} (Ctrl-C stops it)")
    serve(record, port)
