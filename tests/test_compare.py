"""`orchestrate compare`: a real grid sweep on digits (loss.kind x train.seed), each trial's
final checkpoint evaluated on the test split once, grouped, judged and cached."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.entities.names import COMPARE_DIR, RAY_TRIAL_ID
from orchestrator.entities.space import decode_params
from orchestrator.entities.sweep import SweepRecord
from sweep_helpers import DIGITS_SPACE, study_trials, sweep_args
from test_light_commands import loaded
from trainer import metrics as M
from trainer.engine import build_job, load_checkpoint, predict

KINDS, SEEDS, EPOCHS = ["dsn", "mate"], [0, 1], 2


@pytest.fixture(scope="module")
def grid_sweep(local_ray, tmp_path_factory):
    """A finished grid sweep over the two kinds and two seeds, 2 epochs each."""
    workdir = tmp_path_factory.mktemp("compare")
    data = yaml.safe_load(DIGITS_SPACE.read_text())
    data["search"].update(
        num_samples=len(KINDS) * len(SEEDS),
        sampler={"kind": "grid", "seed": 0},
        pruner={"kind": "none", "max_epochs": EPOCHS},
    )
    data["space"] = {
        "loss.kind": {"type": "categorical", "choices": KINDS},
        "train.seed": {"type": "categorical", "choices": SEEDS},
    }
    space = workdir / "grid.yaml"
    space.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["launch", "--space", str(space), *sweep_args(workdir, "g")])
    assert result.exit_code == 0, result.output
    return workdir, SweepRecord.load("g", workdir / "sweeps")


def _compare(workdir, *args: str):
    return CliRunner().invoke(main, ["compare", "g", *args, "--storage", str(workdir / "sweeps")])


def _exit_accuracies(record: SweepRecord, trial) -> list[float]:
    """Test accuracy of each exit of a trial's final checkpoint, then the final exit's
    accuracy on the trial's training images, from the logits."""
    spec = record.spec()
    job = build_job(spec.job_for(decode_params(spec, trial.params)))
    trial_dir = record.directory / f"trial_{trial.user_attrs[RAY_TRIAL_ID]}"
    load_checkpoint(job, max(trial_dir.glob("checkpoint_*")))
    assert job.epoch == EPOCHS
    logits, _ = predict(job, job.data.test)
    train_logits, _ = predict(job, job.data.train)
    train_acc = (train_logits[-1].argmax(dim=-1) == job.data.train.labels).float().mean()
    test_acc = (logits.argmax(dim=-1) == job.data.test.labels).float().mean(dim=1)
    return [*test_acc.tolist(), train_acc.item()]


def test_compare_groups_trials_by_key_and_judges_each_exit_by_seed(grid_sweep):
    workdir, record = grid_sweep
    result = _compare(workdir, "--by", "loss.kind", "--against", "dsn")
    assert result.exit_code == 0, result.output
    assert result.output.count("evaluating on test") == len(KINDS) * len(SEEDS)
    assert "compare-loss.kind.md" in result.output
    table = json.loads((record.directory / "compare-loss.kind.json").read_text())
    groups = {g["group"]: g for g in table["groups"]}
    assert set(groups) == set(KINDS)

    exits = len(record.spec().base.model.exits)
    by_kind: dict[str, dict[int, list[float]]] = {kind: {} for kind in KINDS}
    for trial in study_trials(record):
        params = decode_params(record.spec(), trial.params)
        by_kind[params["loss.kind"]][params["train.seed"]] = _exit_accuracies(record, trial)
    for kind, seeds in by_kind.items():
        assert sorted(t["seed"] for t in groups[kind]["trials"]) == SEEDS
        names = [*(M.exit_acc(k + 1, "test") for k in range(exits)), M.exit_acc(exits, "train")]
        for k, name in enumerate(names):
            values = [seeds[s][k] for s in SEEDS]
            assert groups[kind]["mean"][name] == pytest.approx(statistics.fmean(values))
            assert groups[kind]["std"][name] == pytest.approx(statistics.stdev(values))
    for k in range(exits):  # the paired rule, by hand
        name = M.exit_acc(k + 1, "test")
        differences = [by_kind["mate"][s][k] - by_kind["dsn"][s][k] for s in SEEDS]
        mean = sum(differences) / 2
        margin = 2 * abs(differences[0] - differences[1]) / math.sqrt(2) / math.sqrt(2)
        verdict = table["verdicts"]["mate"][name]
        assert verdict["paired"] and verdict["difference"] == pytest.approx(mean)
        assert verdict["margin"] == pytest.approx(margin)
        outcome = "wins" if mean > margin else "loses" if -mean > margin else "ties"
        assert verdict["outcome"] == outcome
    markdown = (record.directory / "compare-loss.kind.md").read_text()
    assert (
        "| group | trials | exit 1 |" in markdown
        and f"| exit {exits} (train) |" in markdown
        and "| mate vs dsn (paired by seed) |" in markdown
    )
    png = (record.directory / "compare-loss.kind.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_second_compare_reads_the_cache_and_loads_no_torch(grid_sweep):
    workdir, record = grid_sweep
    assert _compare(workdir, "--by", "loss.kind").exit_code == 0
    cached = {p: p.stat().st_mtime_ns for p in (record.directory / COMPARE_DIR).iterdir()}
    assert len(cached) == len(KINDS) * len(SEEDS)
    heavy = loaded("compare", "g", "--by", "train.seed", "--storage", "sweeps", cwd=workdir)
    assert not heavy & {"torch", "ray"}
    assert cached == {p: p.stat().st_mtime_ns for p in cached}  # read, not rewritten
    by_seed = json.loads((record.directory / "compare-train.seed.json").read_text())
    assert sorted(g["group"] for g in by_seed["groups"]) == ["0", "1"]


def test_a_list_valued_key_names_its_groups_in_compact_json(grid_sweep):
    workdir, record = grid_sweep
    result = _compare(workdir, "--by", "model.exits", "--against", "[1, 2, 3, 4]")
    assert result.exit_code == 0, result.output
    table = json.loads((record.directory / "compare-model.exits.json").read_text())
    assert [g["group"] for g in table["groups"]] == ["[1,2,3,4]"]
    assert table["against"] == "[1,2,3,4]" and table["verdicts"] == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--by", "loss.nope"], "--by is 'loss.nope', but must be a key of the job config"),
        (
            ["--by", "loss"],
            "--by is 'loss', a section; name one of its keys (loss.kind, loss.temperature, ",
        ),
        (
            ["--by", "loss.kind", "--against", "byot"],
            "--against is 'byot', but the groups are",
        ),
    ],
)
def test_compare_refuses_a_key_or_group_the_sweep_does_not_have(
    grid_sweep, tmp_path, args, message
):
    workdir, record = grid_sweep
    cache = record.directory / COMPARE_DIR
    if cache.exists():  # without the cache, a refusal after evaluating would show
        cache.rename(tmp_path / COMPARE_DIR)
    try:
        result = _compare(workdir, *args)
        assert result.exit_code == 2
        assert message in result.output and len(result.output.strip().splitlines()) == 1
        assert not cache.exists()  # refused before any checkpoint was evaluated
    finally:
        if (tmp_path / COMPARE_DIR).exists():
            (tmp_path / COMPARE_DIR).rename(cache)
