"""The sweep commands: ``launch``, ``resume``, ``status``, ``promote``, ``report``,
``compare``.

Each command imports its use case inside the function (``# noqa: PLC0415``): `orchestrate
--help` and the read-only ``status`` must not load Ray, MLflow or torch (docs/design.md §6).
"""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator.cli.options import (
    Command,
    exit_interrupted,
    fail_on_input_errors,
    on_interrupt,
    say,
    storage_option,
    stored_urls_options,
    study_storage_option,
    tracking_uri_option,
    verbose_option,
)
from orchestrator.entities.credentials import mask
from orchestrator.entities.env import RAY_ADDRESS, STUDY_STORAGE, TRACKING_URI
from orchestrator.entities.names import LOG_FILE, REPORT_FILE
from orchestrator.entities.sweep import SweepRecord, sweep_name_for
from orchestrator.rendering.console import console, counted

__all__ = ["compare", "launch", "promote", "report", "resume", "status"]


@click.command(
    cls=Command, short_help="Run a sweep: Optuna samples and prunes, Ray runs, MLflow records."
)
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
    envvar=RAY_ADDRESS.name,
    metavar="ADDR",
    help=f"Join this Ray cluster instead of starting a local one. [env: {RAY_ADDRESS.name}]",
)
@click.option("--num-samples", type=int, metavar="N", help="Trials to run. [default: the space's]")
@click.option("--name", metavar="NAME", help="Sweep name. [default: <space name>-<timestamp>]")
@tracking_uri_option(
    f"MLflow tracking URI. [default: {TRACKING_URI.default}; env: {TRACKING_URI.name}]"
)
@storage_option
@study_storage_option(
    "Optuna RDB storage URL, e.g. postgresql://host/db. "
    f"[default: sqlite file in the sweep directory; env: {STUDY_STORAGE.name}]"
)
@click.option(
    "--max-concurrent", type=int, metavar="N", help="Trials at once. [default: as resources allow]"
)
@verbose_option
@fail_on_input_errors
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
    from orchestrator.cli.quiet import library_output_to  # noqa: PLC0415  (see module doc)
    from orchestrator.entities.space import load_space, pruner_note  # noqa: PLC0415
    from orchestrator.tuning.callbacks.progress import SweepProgress  # noqa: PLC0415
    from orchestrator.workflows import launch as launching  # noqa: PLC0415

    spec = load_space(space_file)
    name = name or sweep_name_for(space_file)
    log_path = Path(storage).resolve() / name / LOG_FILE
    with library_output_to(log_path, verbose=verbose) as release_log:
        with (
            on_interrupt("interrupted before the sweep started; nothing was recorded"),
            launching.prepare(
                spec,
                name=name,
                storage_path=storage,
                tracking_uri=tracking_uri,
                study_storage=study_storage,
                gpus=gpus,
                address=address,
                num_samples=num_samples,
                max_concurrent=max_concurrent,
            ) as record,
        ):
            release_log()  # the request is sound: from here on the sweep has a directory
            say(
                f"sweep {record.name}: {record.num_samples} trials of {spec.source} on "
                f"{record.address or 'a local Ray (127.0.0.1)'}, {record.gpus} GPU(s); "
                f"tracking {mask(record.tracking_uri)}"
            )
            if spec.search.multi_objective:
                say(f"objectives: {spec.search.objectives_text}")
            if (note := pruner_note(spec)) is not None:
                say(note)
            _say_log_path(log_path, verbose)
            progress = SweepProgress(
                record.num_samples, spec.max_epochs, record.study_storage, record.name
            )
            with on_interrupt(_resume_line(record.name)):  # also Ctrl-C pressed twice
                launching.launch(spec, record, [progress])
        _finish(record)


@click.command(cls=Command, short_help="Continue an interrupted sweep.")
@click.argument("name", metavar="NAME")
@storage_option
@verbose_option
@stored_urls_options
@fail_on_input_errors
def resume(
    name: str, storage: str, verbose: bool, tracking_uri: str | None, study_storage: str | None
) -> None:
    """Continue an interrupted sweep (after Ctrl-C, or a killed `launch`)."""
    from orchestrator.cli.quiet import library_output_to  # noqa: PLC0415  (see module doc)
    from orchestrator.workflows import resume as resuming  # noqa: PLC0415

    record = SweepRecord.load(name, storage, [tracking_uri, study_storage])
    with library_output_to(record.directory / LOG_FILE, verbose=verbose) as release_log:

        def start() -> None:  # the sweep is checked, and this process holds it
            release_log()
            say(f"resuming sweep {name} from {record.directory}")
            _say_log_path(record.directory / LOG_FILE, verbose)

        with on_interrupt(_resume_line(name)):
            finished_before = resuming.resume(record, on_start=start) is None
        if finished_before:
            say(f"sweep {name} had finished; its MLflow record is complete")
        _finish(record)


def _resume_line(name: str) -> str:
    """What an interrupted sweep says, whether Tune stopped it or Ctrl-C came again while it
    wound down (or MLflow's last writes were waited for): what is left is in its state."""
    return f"interrupted: continue with  orchestrate resume {name}"


def _say_log_path(path: Path, verbose: bool) -> None:
    if not verbose:
        say(f"log: {path} (Ray, MLflow and Optuna messages; --verbose prints them here)")


def _finish(record: SweepRecord) -> None:
    """Top-5 table, the report and the next commands; exit 130 when interrupted."""
    from orchestrator.rendering.tables import trials_table  # noqa: PLC0415  (see module doc)
    from orchestrator.workflows.status import sweep_status  # noqa: PLC0415

    record = record.load(record.name, record.storage_path)  # with the run ids launch set
    now = sweep_status(record)
    metric = now.spec.search.metric
    console.print(trials_table(now.study, metric, limit=5, title=f"top 5 of {record.name}"))
    if not now.finished:
        exit_interrupted(_resume_line(record.name))
    if (record.directory / REPORT_FILE).is_file():
        say(f"report: {record.directory / REPORT_FILE}")
    say(
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


@click.command(
    cls=Command, short_help="Trials, states and best so far of a sweep (or of every sweep)."
)
@click.argument("name", required=False, metavar="NAME")
@storage_option
@stored_urls_options
@fail_on_input_errors
def status(
    name: str | None, storage: str, tracking_uri: str | None, study_storage: str | None
) -> None:
    """Trials, states and best so far of a sweep (or a list of all sweeps)."""
    # Optuna and rich tables, but neither Ray nor MLflow nor torch (see module doc).
    from orchestrator.rendering.tables import sweeps_table, trials_table  # noqa: PLC0415
    from orchestrator.selection.trials import failures  # noqa: PLC0415
    from orchestrator.workflows.status import open_sweep, sweep_rows, sweep_status  # noqa: PLC0415

    full_urls = [tracking_uri, study_storage]
    if name is None:
        rows = sweep_rows(storage, full_urls)
        console.print(sweeps_table(f"sweeps in {storage}", rows, width=console.width))
        return
    now = sweep_status(open_sweep(name, storage, full_urls, study_only=True))
    console.print(trials_table(now.study, now.spec.search.metric, title=f"sweep {name}"))
    for number, reason in failures(now.study):
        console.print(f"trial {number} failed: {reason}", markup=False, soft_wrap=True)
    say(now.summary())
    if now.interrupted:
        say(f"no process runs it now: `orchestrate resume {name}` continues it")
    say(f"MLflow: {mask(now.record.tracking_uri)}, parent run {now.record.parent_run_id}")


@click.command(cls=Command, short_help="Retrain a finished trial on train+val and log its model.")
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
@storage_option
@stored_urls_options
@verbose_option
@fail_on_input_errors
def promote(
    name: str,
    epochs: int | None,
    register: str | None,
    pick: str,
    storage: str,
    tracking_uri: str | None,
    study_storage: str | None,
    verbose: bool,
) -> None:
    """Retrain a finished trial (the best, or the one --pick chooses) on train+val and
    report test metrics."""
    from orchestrator.cli.quiet import library_output_to  # noqa: PLC0415  (see module doc)
    from orchestrator.rendering.console import epoch_progress, exit_table  # noqa: PLC0415
    from orchestrator.selection.pick import parse_pick  # noqa: PLC0415  (see module doc)
    from orchestrator.workflows import promote as promotion  # noqa: PLC0415
    from orchestrator.workflows.status import open_sweep  # noqa: PLC0415

    record = open_sweep(name, storage, [tracking_uri, study_storage])
    search = record.spec().search
    rule = parse_pick(pick, search)
    cfg, number = promotion.final_job_config(record, epochs, rule, register)
    say(
        f"promoting trial {number} of {name} ({rule.describe(search)}): "
        f"{counted(cfg.train.epochs, 'epoch')} on train+val"
    )
    _say_log_path(record.directory / LOG_FILE, verbose)
    with (
        library_output_to(record.directory / LOG_FILE, verbose=verbose) as release_log,
        on_interrupt("interrupted: the final job's MLflow run is KILLED"),
        epoch_progress(cfg.train.epochs, 0, cfg.num_exits) as show,
    ):
        release_log()  # the sweep's directory exists
        result = promotion.promote(record, cfg, number, register=register, on_epoch=show)
    console.print(exit_table(result.metrics, cfg.num_exits, title=f"{name}: final job (test)"))
    console.print(f"MLflow run {result.run_id}")
    if result.model_name:
        console.print(
            f"registered {result.model_name} version {result.model_version} as "
            f"@{promotion.CHAMPION_ALIAS}: {result.model_uri}"
        )
    else:
        console.print(f"logged model {result.model_uri} (--register NAME also registers it)")
    for line in result.usage:
        console.print(line, markup=False, soft_wrap=True)  # "[N, C, H, W]" is no markup


@click.command(cls=Command, short_help="Write the sweep's HTML report and log it to MLflow.")
@click.argument("name", metavar="NAME")
@click.option(
    "--output",
    metavar="DIR",
    default=None,
    help=f"Where {REPORT_FILE} goes. [default: the sweep's directory]",
)
@storage_option
@stored_urls_options
@fail_on_input_errors
def report(
    name: str, output: str | None, storage: str, tracking_uri: str | None, study_storage: str | None
) -> None:
    """Write the sweep's HTML report (plots from the stores; works while it runs) and log it
    to the sweep's MLflow run."""
    from orchestrator.workflows.report import report as write_and_log  # noqa: PLC0415
    from orchestrator.workflows.status import open_sweep  # noqa: PLC0415  (see module doc)

    record = open_sweep(name, storage, [tracking_uri, study_storage])
    path = write_and_log(record, output)
    say(f"wrote {path} (also logged to MLflow run {record.parent_run_id})")


@click.command(cls=Command, short_help="Test accuracy per exit, grouped by a config key, judged.")
@click.argument("name", metavar="NAME")
@click.option(
    "--by", "by", required=True, metavar="KEY", help="Config key to group trials by (loss.kind)."
)
@click.option(
    "--against", metavar="VALUE", help="Reference group each other group is judged against."
)
@click.option(
    "--output",
    metavar="DIR",
    default=None,
    help="Where compare-KEY.md, .json and .png go. [default: the sweep's directory]",
)
@storage_option
@stored_urls_options
@fail_on_input_errors
def compare(
    name: str,
    by: str,
    against: str | None,
    output: str | None,
    storage: str,
    tracking_uri: str | None,
    study_storage: str | None,
) -> None:
    """Test accuracy per exit of a finished sweep's trials, grouped by a config key (mean ±
    std over seeds), with a verdict per exit against a reference group."""
    from orchestrator.rendering.tables import comparison_table  # noqa: PLC0415
    from orchestrator.workflows.compare import compare as compare_sweep  # noqa: PLC0415
    from orchestrator.workflows.status import open_sweep  # noqa: PLC0415  (see module doc)

    record = open_sweep(name, storage, [tracking_uri, study_storage])
    comparison = compare_sweep(
        record, by, against, output, on_evaluate=lambda n: say(f"trial {n}: evaluating on test")
    )
    console.print(comparison_table(comparison.rows(), comparison.title, width=console.width))
    say("wrote " + ", ".join(str(path) for path in comparison.files))
