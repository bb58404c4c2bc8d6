"""``train`` and ``validate``: one job without Ray, and checking a file without running it."""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator.cli.options import Command, fail_on_input_errors, on_interrupt
from orchestrator.entities.names import METRICS_FILE
from orchestrator.entities.space import is_space_file, parse_space
from orchestrator.rendering.console import console, counted, epoch_progress, exit_table
from trainer.config import ConfigError, parse_job_file, read_yaml

__all__ = ["train", "validate"]


@click.command(cls=Command)
@click.option("--config", "config_path", required=True, metavar="FILE", help="Job config (YAML).")
@click.option(
    "--output",
    metavar="DIR",
    default=None,
    help=f"Where {METRICS_FILE} and checkpoint.pt go. [default: outputs/<config name>]",
)
@fail_on_input_errors
def train(config_path: str, output: str | None) -> None:
    """Run one training job, without Ray."""
    # Here, not at the top: torch loads only for the commands that train.
    from orchestrator.workflows import train as training  # noqa: PLC0415

    data = read_yaml(config_path)
    if is_space_file(data):
        raise ConfigError(
            f"{config_path}: a space file, not a job config; "
            f"`orchestrate launch --space {config_path}` runs it"
        )
    cfg = parse_job_file(data, source=config_path)
    out = Path(output or Path("outputs") / Path(config_path).stem)
    with on_interrupt(f"interrupted: nothing written to {out}"):  # loading the data too
        job, out_dir = training.prepare_job(cfg, out)
        console.print(
            f"[bold]{cfg.loss.kind}[/] on {cfg.dataset.name}: {cfg.model.arch}, exits "
            f"{cfg.model.exits}, {counted(cfg.train.epochs, 'epoch')} on {job.device}"
        )
        with epoch_progress(cfg.train.epochs, job.epoch, cfg.num_exits) as show:
            final = training.train(job, out_dir, on_epoch=show)
    title = f"{config_path} after {counted(job.epoch, 'epoch')}"
    console.print(exit_table(final, cfg.num_exits, title=title))
    console.print(f"wrote {out_dir / METRICS_FILE} and {out_dir / 'checkpoint.pt'}")


@click.command(cls=Command)
@click.argument("file", metavar="FILE")
@fail_on_input_errors
def validate(file: str) -> None:
    """Check a space file or a job config without running anything."""
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
