"""CIFAR-10 JPEGs end to end: a subset of the real images through load_splits, and a short
sweep of the shipped ``mate_cifar10.yaml`` through the real CLI, read back from MLflow.

(Named to sort after test_multinode.py: a session Ray started before it leaves
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment, which its ``ray start`` refuses.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from cifar10_jpeg import cifar10_subset
from orchestrator.cli import main
from orchestrator.entities.sweep import SweepRecord
from sweep_helpers import ROOT, child_runs, study_trials, sweep_args
from trainer import metrics as M
from trainer.config import DatasetConfig
from trainer.data import load_splits

SPACE = ROOT / "search_spaces" / "mate_cifar10.yaml"
TRAIN_PER_CLASS, TEST_PER_CLASS = 40, 10
CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]
CLASSES += ["dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def subset(cifar10_root, tmp_path_factory) -> Path:
    """400 training and 100 test images of the real set, 40 and 10 per class (symlinks)."""
    return cifar10_subset(tmp_path_factory.mktemp("cifar10"), TRAIN_PER_CLASS, TEST_PER_CLASS)


def test_cifar10_subset_loads_as_imagefolder(subset):
    cfg = DatasetConfig(
        name="imagefolder", root=str(subset), image_size=32, val_fraction=0.1, train_fraction=0.5
    )
    splits = load_splits(cfg, seed=0)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 3, 32)
    assert torch.bincount(splits.val.labels).tolist() == [4] * 10
    assert torch.bincount(splits.train.labels).tolist() == [18] * 10  # half of the other 36
    assert torch.bincount(splits.test.labels).tolist() == [TEST_PER_CLASS] * 10
    first_cat = Image.open(subset / "test" / "cat" / "0000.jpg")  # classes sort by name
    assert np.array_equal(splits.test.images[30].permute(1, 2, 0).numpy(), np.asarray(first_cat))
    assert sorted(p.name for p in (subset / "train").iterdir()) == CLASSES


@pytest.fixture(scope="module")
def sweep(local_ray, subset, tmp_path_factory):
    """The shipped CIFAR-10 space on the subset, launched by the CLI: 2 trials of at most 2
    epochs, running side by side."""
    workdir = tmp_path_factory.mktemp("cifar10-sweep")
    data = yaml.safe_load(SPACE.read_text())
    data["base"]["dataset"]["root"] = str(subset)
    data["base"]["train"]["epochs"] = 2
    data["search"].update(num_samples=2)
    data["search"]["pruner"].update(min_resource=1, reduction_factor=2)
    space = workdir / "cifar10_short.yaml"
    space.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(
        main, ["launch", "--space", str(space), *sweep_args(workdir, "cifar10")]
    )
    assert result.exit_code == 0, result.output
    return SweepRecord.load("cifar10", workdir / "sweeps")


def test_cifar10_sweep_records_per_exit_metrics_for_every_trial(sweep, subset):
    trials = {t.number: t for t in study_trials(sweep)}
    assert len(trials) == 2
    assert {t.state for t in trials.values()} <= {
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
    }
    client = MlflowClient(sweep.tracking_uri)
    runs = child_runs(sweep)
    assert sorted(int(r.data.tags["optuna_trial_number"]) for r in runs) == [0, 1]
    for run in runs:
        params = run.data.params
        assert (params["dataset.name"], params["model.arch"]) == ("imagefolder", "resnet20")
        assert (params["dataset.image_size"], params["dataset.train_fraction"]) == ("32", "0.2")
        epochs = len(trials[int(run.data.tags["optuna_trial_number"])].intermediate_values)
        exits = json.loads(params["model.exits"])
        assert exits[-1] == 9
        for k in range(1, len(exits) + 1):
            history = client.get_metric_history(run.info.run_id, M.exit_acc(k))
            assert [m.step for m in history] == list(range(1, epochs + 1))
            assert all(0.0 <= m.value <= 1.0 for m in history)
            assert 0 < run.data.metrics[M.exit_gflops(k)] < 0.1  # resnet20: 0.08 G to the end
    cache = Path(os.environ["MATE_IMAGE_CACHE"])
    for split in ("train", "test"):  # every trial mapped the same decoded arrays
        (slot,) = cache.glob(f"{subset.name}-{split}-32px-*")
        assert [p.suffix for p in slot.iterdir() if p.name != "lock"] == [".npy"]
