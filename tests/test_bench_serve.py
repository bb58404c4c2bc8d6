"""The serving benchmark's threshold rules (which images leave where, against a hand-worked case),
its time by kind of operator (torch.profiler's names for a small network's operators), and its
table of what serving adds (on a digits model logged and loaded as MLflow serves it)."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn

from trainer.config import parse_job_config
from trainer.engine import build_job
from trainer.serving import log_servable_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _full_network import FullNetwork
from _serving_costs import operator_ms, own_work
from _threshold_rules import leaving_shares, threshold_rules

# Three exits, four images. Exit 1 is sure of images 0 (0.9) and 3 (0.7), half sure of 1
# (0.6), unsure of 2 (0.4); exit 2 is sure of 0, 1, 3 (0.85 and up) and not of 2 (0.6).
CONFIDENCE = torch.tensor([[0.9, 0.6, 0.4, 0.7], [0.95, 0.85, 0.6, 0.9], [1.0, 1.0, 1.0, 1.0]])
CORRECT = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
GRID = torch.tensor([0.5, 0.8])
# An untrained digits convnet: the timings need a served model, not a good one.
DIGITS = {"dataset": {"name": "digits"}, "model": {"arch": "convnet"}, "train": {"device": "cpu"}}


def test_shares_and_accuracy_for_every_pair_of_thresholds() -> None:
    share, accuracy = leaving_shares(CONFIDENCE, CORRECT, GRID)
    # [threshold at exit 1, threshold at exit 2, exit]; worked by hand image by image
    expected_share = torch.tensor(
        [
            [[0.75, 0.25, 0.0], [0.75, 0.0, 0.25]],  # exit 1 at 0.5: 0, 1, 3 leave there
            [[0.25, 0.75, 0.0], [0.25, 0.5, 0.25]],  # exit 1 at 0.8: only 0 leaves there
        ]
    )
    torch.testing.assert_close(share, expected_share)
    torch.testing.assert_close(accuracy, torch.tensor([[0.5, 0.75], [0.75, 1.0]]))


def test_rules_pick_the_cheapest_thresholds_within_half_a_point(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The full network (exit 3) is right on 3 of 4: (0.5, 0.5) at 0.5 is out. Costs 0.3, 0.7,
    # 1.1: (0.8, 0.5) 0.600, (0.5, 0.8) 0.500, (0.8, 0.8) 0.700.
    threshold_rules(CONFIDENCE, CORRECT, torch.tensor([0.3, 0.7, 1.1]), GRID)
    out = capsys.readouterr().out
    assert "one threshold: 0.8, 0.8 -> 0.700 of the full network's time (1.43x)" in out
    assert "a threshold per exit: 0.5, 0.8 -> 0.500 of the full network's time (2.00x)" in out
    assert "shares leaving at each exit 0.75 0.00 0.25" in out


class _Block(nn.Module):
    """conv -> batch norm -> ReLU, a residual add, then the rows whose first logit is positive
    through a linear layer: one of each kind of operator the benchmark names."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = (x + self.body(x)).mean(dim=(2, 3))
        return self.fc(pooled[pooled[:, 0] > 0])


def test_operator_ms_names_the_kinds_a_network_runs() -> None:
    block = _Block().eval()
    with torch.no_grad():
        ms = operator_ms(block, [torch.randn(8, 4, 6, 6) for _ in range(3)])
    assert all(ms.values()), ms  # every kind, "other" included (the pooling's mean)
    with torch.no_grad():  # without the layers, their kinds cost nothing
        bare = operator_ms(lambda x: x.mean(dim=(2, 3)), [torch.randn(8, 4, 6, 6)])
    assert bare["convolutions"] == bare["ReLUs"] == bare["linear layers"] == 0.0
    assert bare["other"] > 0.0


def test_own_work_times_each_layer_of_serving_on_a_served_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = build_job(parse_job_config(DIGITS))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("bench", artifact_location=tmp_path.as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_servable_model(job.model, job.cfg, job.data)
        served = mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cpu"})
    finally:
        mlflow.set_tracking_uri(None)
    images = job.data.test.images[:8].numpy()
    own_work(served, FullNetwork(served, images.shape[1:]), images, 0.5, batch=4, rounds=1)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[-5:]]
    ms = [float(row[-3] if row[-2][0] in "+-" else row[-2]) for row in rows]
    assert [" ".join(row[:3]) for row in rows] == [
        "full network alone",
        "full, uint8 in,",
        "early exit alone",
        "early exit, uint8",
        "early exit through",
    ]
    assert all(value > 0 for value in ms), rows
    assert rows[0][-1] == "1.00x"
    for later, earlier in ((1, 0), (3, 2), (4, 3)):  # each "added" is the row above's gap
        added = float(rows[later][-2])
        assert added == pytest.approx(ms[later] - ms[earlier], abs=0.02), rows
