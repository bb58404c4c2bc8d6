"""The `orchestrate` command line (DESIGN §6).

Bad input ends with one line naming the problem and exit status 2, before Ray starts or
anything is recorded. Heavy imports (torch, Ray, MLflow) happen inside the commands.
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

from trainer.config import ConfigError, JobConfig, parse_job_config, read_yaml

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])
EXIT_INTERRUPTED = 130


class InputError(click.ClickException):
    """Bad user input: one line on stderr, exit status 2, nothing started."""

    exit_code = 2


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


def _load_job(path: str) -> JobConfig:
    data = read_yaml(path)
    return parse_job_config(data, source=path)


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mate-orchestrator")
def main() -> None:
    """Hyperparameter search and experiment orchestration for multi-exit self-distillation."""


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

    cfg = _load_job(config_path)
    out_dir = Path(output or Path("outputs") / Path(config_path).stem)
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
            f"{spec.search.num_samples} trials, {spec.search.metric} {spec.search.mode})"
        )
        return
    cfg = parse_job_config(data, source=file)
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
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    metavar="URI",
    help="MLflow tracking URI. [default: sqlite:///mlruns/mlflow.db; env: MLFLOW_TRACKING_URI]",
)
@_storage_option
@click.option(
    "--study-storage",
    envvar="MATE_STUDY_STORAGE",
    metavar="URL",
    help="Optuna RDB storage URL, e.g. postgresql://host/db. "
    "[default: sqlite file in the sweep directory; env: MATE_STUDY_STORAGE]",
)
@click.option(
    "--max-concurrent", type=int, metavar="N", help="Trials at once. [default: as resources allow]"
)
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
) -> None:
    """Run a hyperparameter sweep: Optuna proposes and prunes, Ray runs, MLflow records."""
    from orchestrator import sweep
    from orchestrator.progress import SweepProgress
    from orchestrator.space import load_space

    spec = load_space(space_file)
    record = sweep.prepare(
        spec,
        name=name or sweep.sweep_name_for(space_file),
        storage_path=storage,
        tracking_uri=tracking_uri,
        study_storage=study_storage,
        gpus=gpus,
        address=address,
        num_samples=num_samples,
        max_concurrent=max_concurrent,
    )
    click.echo(
        f"sweep {record.name}: {record.num_samples} trials of {spec.source} on "
        f"{record.address or 'a local Ray (127.0.0.1)'}, {record.gpus} GPU(s); "
        f"tracking {record.tracking_uri}"
    )
    progress = SweepProgress(
        record.num_samples, spec.max_epochs, spec.search.metric, spec.search.mode
    )
    sweep.launch(spec, record, [progress])
    _finish(record)


@main.command()
@click.argument("name", metavar="NAME")
@_storage_option
@_fail_on_input_errors
def resume(name: str, storage: str) -> None:
    """Continue an interrupted sweep."""
    from orchestrator import sweep

    record = sweep.SweepRecord.load(name, storage)
    click.echo(f"resuming sweep {name} from {record.directory}")
    sweep.resume(record)
    _finish(record)


def _finish(record) -> None:
    """Top-5 table and the next commands; exit 130 when the sweep was interrupted."""
    from orchestrator.console import console
    from orchestrator.report import load_study, state_counts, trials_table

    study = load_study(record)
    spec = record.spec()
    console.print(trials_table(study, spec.search.metric, limit=5, title=f"top 5 of {record.name}"))
    counts = state_counts(study)
    unfinished = len(study.trials) < record.num_samples or counts.get("RUNNING", 0) > 0
    if unfinished:
        console.print(f"interrupted: continue with  orchestrate resume {record.name}")
        sys.exit(EXIT_INTERRUPTED)
    console.print(
        "next:\n"
        f"  orchestrate status {record.name}\n"
        f"  orchestrate ui                      # browse runs at http://127.0.0.1:5000\n"
        f"  orchestrate promote {record.name} --register {record.name.split('-')[0]}"
    )


@main.command()
@click.argument("name", required=False, metavar="NAME")
@_storage_option
@_fail_on_input_errors
def status(name: str | None, storage: str) -> None:
    """Trials, states and best so far of a sweep (or a list of all sweeps)."""
    from orchestrator.console import console
    from orchestrator.report import best_trial, load_study, state_counts, sweeps_table, trials_table
    from orchestrator.sweep import SweepRecord

    if name is None:
        console.print(sweeps_table(storage))
        return
    record = SweepRecord.load(name, storage)
    spec = record.spec()
    study = load_study(record)
    console.print(trials_table(study, spec.search.metric, title=f"sweep {name}"))
    counts = " ".join(f"{k.lower()} {v}" for k, v in sorted(state_counts(study).items()))
    best = best_trial(study)
    best_text = "none finished yet" if best is None else f"trial {best.number}: {best.value:.4f}"
    console.print(f"{len(study.trials)}/{record.num_samples} trials ({counts}); best {best_text}")
    console.print(f"MLflow: {record.tracking_uri}, parent run {record.parent_run_id}")


@main.command()
@click.argument("name", metavar="NAME")
@click.option("--epochs", type=int, metavar="N", help="Final schedule. [default: base config's]")
@click.option("--register", metavar="MODEL_NAME", help="Register the model; alias `champion`.")
@_storage_option
@_fail_on_input_errors
def promote(name: str, epochs: int | None, register: str | None, storage: str) -> None:
    """Retrain the best finished trial on train+val and report test metrics."""
    from orchestrator import promote as promotion
    from orchestrator.console import console, epoch_progress, exit_table
    from orchestrator.sweep import SweepRecord

    record = SweepRecord.load(name, storage)
    cfg, number = promotion.final_job_config(record, epochs)
    console.print(f"promoting trial {number} of {name}: {cfg.train.epochs} epochs on train+val")
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
@click.option("--port", type=int, default=5000, show_default=True, metavar="PORT")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", metavar="URI")
def ui(port: int, tracking_uri: str | None) -> None:
    """The MLflow UI on 127.0.0.1 against the sweeps' tracking store."""
    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    click.echo(f"MLflow UI for {uri} at http://127.0.0.1:{port}")
    args = ["-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    os.execv(sys.executable, [sys.executable, *args, "--port", str(port)])
