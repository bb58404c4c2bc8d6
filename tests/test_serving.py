"""The servable early-exit model: a digits convnet trained for a few epochs, logged and
registered in a sqlite MLflow store, then loaded in Python, in a process that cannot import
the project, and served by ``mlflow models serve``; every answer is checked against the
trainer's own anytime evaluation of the same test images."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainer import metrics as M
from trainer.config import apply_overrides, parse_job_config
from trainer.engine import Job, build_job, evaluate, fit, predict
from trainer.models import MultiExitNet
from trainer.serving import log_servable_model

MODEL = "mate_digits"
URI = f"models:/{MODEL}@champion"
THRESHOLD = 0.9  # the job's train.exit_threshold
OTHER = 0.6  # passed per call in params
JOB = {
    "dataset": {"name": "digits", "val_fraction": 0.0},
    "model": {"arch": "convnet"},
    "train": {"epochs": 3, "batch_size": 64, "device": "cpu", "exit_threshold": THRESHOLD},
}


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> Iterator[tuple[Job, str]]:
    """(the trained job, the store's tracking URI) with the job's network registered as
    `mate_digits@champion`."""
    work = tmp_path_factory.mktemp("serving")
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    job = build_job(parse_job_config(JOB))
    fit(job)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        artifacts = (work / "artifacts").as_uri()
        experiment = MlflowClient().create_experiment("serving", artifact_location=artifacts)
        with mlflow.start_run(experiment_id=experiment):
            info = log_servable_model(job.model, job.cfg, job.data, registered_model_name=MODEL)
        MlflowClient().set_registered_model_alias(MODEL, "champion", info.registered_model_version)
        yield job, tracking_uri
    finally:
        mlflow.set_tracking_uri(None)


def trainer_answers(job: Job, threshold: float) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per test image the trainer's anytime decision (class, 1-based exit, its GFLOPs) from
    the full network's logits, and the trainer's evaluation metrics at `threshold`."""
    logits = predict(job, job.data.test).logits  # [K, N, C]
    confidence, predicted = logits.softmax(dim=-1).max(dim=-1)  # [K, N]
    exits = M.exit_at_threshold(confidence, torch.tensor([threshold]))[0]  # [N]
    answers = pd.DataFrame(
        {
            "class": predicted.gather(0, exits[None])[0].numpy(),
            "exit": exits.numpy() + 1,
            "gflops": np.asarray(job.gflops)[exits.numpy()],
        }
    )
    at_threshold = apply_overrides(job.cfg, {"train.exit_threshold": threshold}, source="test")
    metrics = evaluate(dataclasses.replace(job, cfg=at_threshold), job.data.test, "test")
    return answers, metrics


def assert_same_answers(served: pd.DataFrame, job: Job, threshold: float) -> None:
    expected, metrics = trainer_answers(job, threshold)
    for column in ("class", "exit", "gflops"):
        np.testing.assert_array_equal(served[column].to_numpy(), expected[column].to_numpy())
    correct = served["class"].to_numpy() == job.data.test.labels.numpy()
    # the trainer reports float32 means
    assert np.float32(correct.mean()) == np.float32(metrics["test/anytime_acc"])
    assert np.float32(served["gflops"].mean()) == np.float32(metrics["test/anytime_gflops"])


def test_serving_pyfunc_equals_trainer_anytime_evaluation(champion):
    job, _ = champion
    model = mlflow.pyfunc.load_model(URI)
    images = job.data.test.images.numpy()  # uint8 [360, 1, 8, 8]
    default = model.predict(images)
    other = model.predict(images, params={"threshold": OTHER})
    assert_same_answers(default, job, THRESHOLD)
    assert_same_answers(other, job, OTHER)
    pd.testing.assert_frame_equal(model.predict(images, params={"threshold": None}), default)
    # both thresholds send images out at more than one exit, and the lower one earlier
    assert default["exit"].nunique() > 1 and other["exit"].nunique() > 1
    assert other["exit"].mean() < default["exit"].mean()
    assert (default["confidence"][default["exit"] < job.cfg.num_exits] >= THRESHOLD).all()
    with pytest.raises(MlflowException, match=r"`threshold` is 1.5, but must be in \(0, 1\]"):
        model.predict(images, params={"threshold": 1.5})


def test_serving_runs_only_undecided_images_through_later_blocks(champion):
    """Images that left at exit k never enter the blocks after it: count them per block."""
    job, _ = champion
    model = mlflow.pyfunc.load_model(URI)
    network = model.get_raw_model()
    entered = [0] * len(network.backbone.blocks)  # images that went through each block

    def count(index: int):
        def hook(_, args) -> None:
            entered[index] += args[0].shape[0]

        return hook

    hooks = [
        block.register_forward_pre_hook(count(i)) for i, block in enumerate(network.backbone.blocks)
    ]
    try:
        exits = model.predict(job.data.test.images.numpy())["exit"].to_numpy()
    finally:
        for hook in hooks:
            hook.remove()
    last_block = np.asarray(job.cfg.model.exits)[exits - 1]  # the block each image left after
    expected = [int((last_block >= b).sum()) for b in range(1, len(entered) + 1)]
    assert entered == expected
    assert entered[-1] < len(exits)


def test_serving_model_carries_signature_example_and_raw_network(champion):
    job, _ = champion
    info = mlflow.models.get_model_info(URI)
    assert info.signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": (-1, 1, 8, 8)}}
    ]
    assert info.signature.params.to_dict() == [
        {"name": "threshold", "type": "double", "default": THRESHOLD, "shape": None}
    ]
    assert info.saved_input_example_info is not None
    assert set(info.flavors) == {"pytorch", "python_function"}
    path = mlflow.artifacts.download_artifacts(URI)
    requirements = Path(path, "requirements.txt").read_text()
    assert "mate-orchestrator" not in requirements and "torch==" in requirements
    network = mlflow.pytorch.load_model(URI)
    assert isinstance(network, MultiExitNet)
    torch.testing.assert_close(network.state_dict(), job.model.state_dict())


_OUTSIDE = """
import importlib.util, json, os, sys
# Forget the project: its editable install's finder, and any path entry holding trainer/.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "trainer"))]
assert importlib.util.find_spec("trainer") is None, "the project is importable"
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
import trainer
images = np.load(sys.argv[2])
out = model.predict(images, params={"threshold": float(sys.argv[3])})
print(json.dumps({"trainer": trainer.__file__, "answers": out.to_dict(orient="list")}))
"""


def test_serving_model_loads_where_the_project_is_not_installed(champion, tmp_path):
    job, tracking_uri = champion
    images = job.data.test.images.numpy()
    np.save(tmp_path / "images.npy", images)
    model_dir = mlflow.artifacts.download_artifacts(URI, dst_path=str(tmp_path / "model"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", _OUTSIDE, model_dir, str(tmp_path / "images.npy"), "0.6"],
        cwd=tmp_path,
        env={**env, "MLFLOW_TRACKING_URI": tracking_uri},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["trainer"] == os.path.join(model_dir, "code", "trainer", "__init__.py")
    assert_same_answers(pd.DataFrame(result["answers"]), job, OTHER)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_serving_mlflow_models_serve_answers_as_the_trainer(champion, tmp_path):
    job, tracking_uri = champion
    port = _free_port()
    bin_dir = os.path.dirname(sys.executable)  # the server runs `uvicorn` from PATH
    command = [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", URI]
    command += ["--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(
            command,
            cwd=tmp_path,
            env={
                **os.environ,
                "MLFLOW_TRACKING_URI": tracking_uri,
                "PATH": os.pathsep.join([bin_dir, os.environ["PATH"]]),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the server did not answer /ping in 90 s"
                time.sleep(0.5)
        images = job.data.test.images.numpy().tolist()
        default = _post(f"{base}/invocations", {"inputs": images})
        other = _post(f"{base}/invocations", {"inputs": images, "params": {"threshold": OTHER}})
        assert_same_answers(pd.DataFrame(default["predictions"]), job, THRESHOLD)
        assert_same_answers(pd.DataFrame(other["predictions"]), job, OTHER)
    finally:  # the server and the uvicorn worker it started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
