"""The libraries' output goes to the sweep's log file; the project's own stays on the terminal."""

from __future__ import annotations

import logging
import warnings

import pytest

from orchestrator.cli.quiet import library_output_to
from orchestrator.rendering.console import console
from trainer.config import ConfigError


def _libraries_speak() -> None:
    logging.getLogger("ray.tune.tune").warning("ray says")
    logging.getLogger("mlflow.store").warning("mlflow says")
    print("tune prints")
    warnings.warn("a library warns", UserWarning, stacklevel=1)


def test_library_output_goes_to_the_log_file(tmp_path, capsys):
    log = tmp_path / "sweep" / "sweep.log"
    with library_output_to(log) as release:
        logging.getLogger("ray").info("held until the sweep is recorded")
        release()
        _libraries_speak()
        console.print("ours")
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("ours\n", "")
    text = log.read_text()
    assert text.index("INFO ray: held until the sweep is recorded") < text.index("ray says")
    for line in ("WARNING ray.tune.tune: ray says", "WARNING mlflow.store: mlflow says"):
        assert line in text
    assert "tune prints" in text and "UserWarning: a library warns" in text


def test_handlers_come_back_after_the_sweep(tmp_path):
    ray_logger = logging.getLogger("ray")
    before = (list(ray_logger.handlers), ray_logger.propagate)
    with library_output_to(tmp_path / "sweep.log"):
        assert ray_logger.propagate is False
    assert (list(ray_logger.handlers), ray_logger.propagate) == before


def test_bad_input_before_the_sweep_is_recorded_leaves_no_file(tmp_path, capsys):
    with pytest.raises(ConfigError), library_output_to(tmp_path / "s" / "sweep.log"):
        logging.getLogger("ray").warning("joined the cluster")
        raise ConfigError("--gpus is 3, but the cluster has 2 GPU(s)")
    assert not (tmp_path / "s").exists()
    assert capsys.readouterr().err == ""


def test_a_crash_before_the_sweep_is_recorded_shows_the_held_lines(tmp_path, capsys):
    with pytest.raises(ConnectionError), library_output_to(tmp_path / "s" / "sweep.log"):
        logging.getLogger("ray").warning("could not reach the head node")
        raise ConnectionError("head node down")
    assert "WARNING ray: could not reach the head node" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_verbose_leaves_the_output_where_it_was(tmp_path, capsys):
    with library_output_to(tmp_path / "sweep.log", verbose=True) as release:
        release()
        print("tune prints")
    assert capsys.readouterr().out == "tune prints\n"
    assert not (tmp_path / "sweep.log").exists()
