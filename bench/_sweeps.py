"""What the sweep benches share: a real `orchestrate launch`, and Ray's stock searcher and
scheduler set up as a Tune user would for a space.

Importable from the bench scripts only (``python bench/<name>.py`` puts bench/ on sys.path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from orchestrator.entities.space import SpaceSpec
from orchestrator.entities.sweep import SweepRecord
from orchestrator.stores.study import make_sampler, optuna_distributions
from trainer import metrics as M

__all__ = ["launch_sweep", "stock_search"]


def launch_sweep(space: dict, work: Path, name: str) -> SweepRecord:
    """Run `space` as a real sweep through `orchestrate launch` on a local Ray, its stores in
    `work`; the sweep's record once it has ended."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    command = [str(Path(sys.executable).with_name("orchestrate")), "launch"]
    command += ["--space", str(path), "--name", name, "--storage", str(work / "sweeps")]
    command += ["--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    subprocess.run(command, cwd=work, check=True, env={**os.environ, "RAY_ADDRESS": ""})
    return SweepRecord.load(name, work / "sweeps")


def stock_search(spec: SpaceSpec) -> tuple[OptunaSearch, ASHAScheduler]:
    """Ray's stock OptunaSearch (the space's sampler) and ASHAScheduler (its pruner's
    settings), as a Tune user would set them up for `spec`."""
    search = spec.search
    searcher = OptunaSearch(
        space=optuna_distributions(spec),
        metric=search.metric,
        mode=search.mode,
        sampler=make_sampler(spec),
    )
    scheduler = ASHAScheduler(
        time_attr=M.EPOCH,
        metric=search.metric,
        mode=search.mode,
        max_t=spec.max_epochs,
        grace_period=search.pruner.min_resource,
        reduction_factor=search.pruner.reduction_factor,
    )
    return searcher, scheduler
