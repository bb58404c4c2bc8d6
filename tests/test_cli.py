import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.cli.options import EXIT_INTERRUPTED
from sweep_helpers import interruptible, sweep_record
from trainer import metrics as M

TINY = """
dataset: {name: digits, val_fraction: 0.2}
model: {arch: convnet, exits: [2, 4]}
optim: {lr: 0.05}
train: {epochs: 2, batch_size: 128}
"""


@pytest.fixture
def runner():
    return CliRunner()


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_train_writes_metrics_and_checkpoint(runner, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(main, ["train", "--config", write(tmp_path, TINY), "--output", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(M.epoch_metric_names(2)) <= set(metrics)
    assert metrics[M.exit_gflops(1)] < metrics[M.exit_gflops(2)]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    assert state["config"]["model"]["exits"] == [2, 4]
    assert "exit" in result.output and "ensemble" in result.output
    assert "2 epochs on cpu" in result.output and "after 2 epochs" in result.output


def test_train_of_one_epoch_says_epoch(runner, tmp_path):
    config = write(tmp_path, TINY.replace("epochs: 2", "epochs: 1"))
    result = runner.invoke(main, ["train", "--config", config, "--output", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "1 epoch on cpu" in result.output and "after 1 epoch" in result.output
    assert "epochs" not in result.output


DIGITS_KIND = """
dataset: {{name: digits, val_fraction: 0.2}}
model: {{arch: convnet, exits: [1, 2, 3, 4]}}
loss: {{kind: {kind}}}
optim: {{lr: 0.05}}
train: {{epochs: 6, batch_size: 64}}
"""


@pytest.mark.parametrize("kind", ["dsn", "byot", "eed", "phuong_lampert", "mate"])
def test_train_every_kind_with_its_defaults_learns_digits(runner, tmp_path, kind):
    config = write(tmp_path, DIGITS_KIND.format(kind=kind))
    out = tmp_path / "out"
    result = runner.invoke(main, ["train", "--config", config, "--output", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[M.exit_acc(4)] >= 0.90
    assert set(M.epoch_metric_names(4, kind)) <= set(metrics)
    if kind == "phuong_lampert":  # annealed from 1 while the final exit is confident
        assert metrics[M.TRAIN_TEMPERATURE] > 1.05


def test_validate_accepts_good_config(runner, tmp_path):
    result = runner.invoke(main, ["validate", write(tmp_path, TINY)])
    assert result.exit_code == 0
    assert "valid job config (mate, convnet with exits [2, 4], digits)" in result.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("loss: {primary_weight: 1.4}\n", "`loss.primary_weight` is 1.4, but input should be"),
        ("loss: {colour: red}\n", "unknown key `loss.colour`"),
        ("model: {exits: [3, 1]}\n", "`model.exits` is [3, 1], but must be strictly ascending"),
        ("loss: [\n", "not valid YAML"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "train"])
def test_bad_config_exits_2_with_one_line(runner, tmp_path, command, text, message):
    path = write(tmp_path, text)
    args = [command, path] if command == "validate" else [command, "--config", path]
    result = runner.invoke(main, args)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert message in result.output
    assert not (tmp_path / "outputs").exists()


def test_train_missing_cifar_exits_2_naming_the_path(runner, tmp_path):
    config = write(tmp_path, f"dataset: {{name: cifar100, root: {tmp_path / 'data'}}}\n")
    result = runner.invoke(main, ["train", "--config", config, "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert str(tmp_path / "data") in result.output
    assert "download" in result.output
    assert not (tmp_path / "o").exists()


def test_train_interrupted_ends_130_and_writes_nothing(tmp_path):
    """Ctrl-C once training has started (its first line printed): status 130, one line."""
    config = write(tmp_path, TINY.replace("epochs: 2", "epochs: 500"))
    out = tmp_path / "out"
    orchestrate = str(Path(sys.executable).with_name("orchestrate"))
    process = subprocess.Popen(
        interruptible([orchestrate, "train", "--config", config, "--output", str(out)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first = process.stdout.readline()  # printed once the job is built, before its first epoch
    assert first.startswith("mate on digits: convnet, exits [2, 4], 500 epochs"), first
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, output
    assert output.rstrip().endswith(f"interrupted: nothing written to {out}"), output
    assert "Traceback" not in output and "Aborted!" not in output
    assert not out.exists() or not any(out.iterdir())


def test_ctrl_c_while_a_command_waits_for_a_store_ends_130(tmp_path):
    """Ctrl-C where no command has its own message (here `status`, waiting for a study
    storage that takes the connection and never answers): one line, status 130."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    record = sweep_record(tmp_path, "s", f"postgresql://postgres@127.0.0.1:{port}/optuna")
    record.directory.mkdir(parents=True)
    record.save()
    orchestrate = str(Path(sys.executable).with_name("orchestrate"))
    process = subprocess.Popen(
        interruptible([orchestrate, "status", "--storage", record.storage_path]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server.settimeout(60)
    with server, server.accept()[0]:  # the command is connecting: it waits for an answer
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert (stdout, stderr) == ("interrupted\n", "")


def test_the_command_list_says_each_command_whole_at_80_columns(runner):
    result = runner.invoke(main, ["--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    listed = result.output.split("Commands:\n")[1].splitlines()
    assert sorted(line.split()[0] for line in listed) == sorted(main.commands)
    assert all(len(line) <= 80 and not line.endswith("...") for line in listed), listed
