"""Terminal output: live epoch progress and per-exit tables (rich)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from trainer import metrics as M

console = Console()


def counted(count: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``: `count` and `noun`, plural unless `count` is 1."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


@contextmanager
def epoch_progress(
    total: int, completed: int, num_exits: int
) -> Iterator[Callable[[Mapping[str, float]], None]]:
    """Live epoch bar; yields the `on_epoch` callback that advances it."""
    progress = Progress(
        TextColumn("[bold]epoch"),
        MofNCompleteColumn(),
        BarColumn(bar_width=10),  # leaves room for four exits' accuracies at 80 columns
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
    )
    task = progress.add_task("", total=total, completed=completed)

    def advance(metrics: Mapping[str, float]) -> None:
        progress.update(
            task, completed=metrics[M.EPOCH], description=epoch_summary(metrics, num_exits)
        )

    with progress:
        yield advance


def _split(metrics: Mapping[str, float]) -> str:
    """The split a job evaluated on: val, or test when it trained on train+val."""
    return "val" if M.exit_acc(1) in metrics else "test"


def epoch_summary(metrics: Mapping[str, float], num_exits: int) -> str:
    """One line: loss and each exit's validation accuracy, shallowest first."""
    split = _split(metrics)
    accs = " ".join(f"{metrics[M.exit_acc(k, split)]:.3f}" for k in range(1, num_exits + 1))
    return f"loss {metrics[M.TRAIN_LOSS]:.4f}  {split} acc [{accs}]"


def exit_table(metrics: Mapping[str, float], num_exits: int, title: str) -> Table:
    """Per-exit accuracy, loss and cumulative GFLOPs, plus ensemble and anytime rows."""
    split = _split(metrics)
    table = Table(title=title)
    for column in ("exit", "accuracy", "loss", "GFLOPs"):
        table.add_column(column, justify="right")
    for k in range(1, num_exits + 1):
        table.add_row(
            str(k),
            f"{metrics[M.exit_acc(k, split)]:.4f}",
            f"{metrics[M.exit_loss(k, split)]:.4f}",
            f"{metrics[M.exit_gflops(k)]:.4g}",
        )
    table.add_row("ensemble", f"{metrics[M.with_split(M.ENSEMBLE_ACC, split)]:.4f}", "", "")
    table.add_row(
        "anytime",
        f"{metrics[M.with_split(M.ANYTIME_ACC, split)]:.4f}",
        "",
        f"{metrics[M.with_split(M.ANYTIME_GFLOPS, split)]:.4g}",
    )
    table.caption = f"anytime AUC {metrics[M.with_split(M.ANYTIME_AUC, split)]:.4f}"
    return table
