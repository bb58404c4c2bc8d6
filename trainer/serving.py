"""The promoted network as one MLflow model: the raw network for ``mlflow.pytorch.load_model``
and anytime early-exit inference for ``mlflow.pyfunc`` (so for ``mlflow models serve``).

Input: uint8 images [N, C, H, W], the layout of the project's data sets (channels first:
``np.asarray(pil_image).transpose(2, 0, 1)`` for one RGB image); the training normalisation
is inside the model. Output: a DataFrame with one row per image: ``class``, ``confidence``
(the max softmax at the exit taken), ``exit`` (1-based, as in ``exit{k}/gflops``) and
``gflops`` (that exit's cumulative ``exit{k}/gflops``: what the image cost). The inference
parameter ``threshold`` (default: the job's ``train.exit_threshold``) is the confidence at
which an image leaves (:mod:`trainer.models.early_exit`).

The model directory holds the pickled network (the ``pytorch`` flavor), the ``trainer``
package (``code/``, put first on ``sys.path`` by MLflow when it loads the model, so the
project need not be installed), and a ``python_function`` flavor whose loader is this
module. What it needs to serve (normalisation, exit costs, threshold) is in the MLmodel's
``metadata``, readable in the MLflow UI.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pytorch
import numpy as np
import pandas as pd
import torch
from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME, ModelInfo
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from trainer.models import MultiExitNet, exit_gflops
from trainer.models.early_exit import ExitDecision, early_exit
from trainer.pixels import normalise, pixel_affine
from trainer.precision import autocast_dtype

if TYPE_CHECKING:
    from trainer.config import JobConfig
    from trainer.data import DataSplits

__all__ = ["ServingSpec", "log_servable_model", "usage_lines"]

METADATA_KEY = "early_exit"
THRESHOLD_PARAM = "threshold"
_TRAINER_DIR = Path(__file__).resolve().parent
# What the pickled network and this loader import (the served environment's requirements;
# never the project itself, whose code travels in code/).
_REQUIREMENTS = ("mlflow", "torch", "torchvision", "numpy", "pandas", "pydantic", "pyyaml")


@dataclass(frozen=True)
class ServingSpec:
    """Everything besides the weights that serving needs, from the training job."""

    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, in [0, 1] units (the training normalisation)
    std: tuple[float, ...]
    exit_gflops: tuple[float, ...]  # cumulative GFLOPs per sample to reach exit 1..K
    threshold: float  # default confidence threshold: train.exit_threshold
    precision: str  # train.precision: bf16 autocast where the trainer would use it
    batch_size: int  # images per forward pass, as in the trainer's evaluation

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingSpec:
        tuples = ("input_shape", "mean", "std", "exit_gflops")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})

    def signature(self) -> ModelSignature:
        outputs = [
            ColSpec("long", "class"),
            ColSpec("float", "confidence"),
            ColSpec("long", "exit"),
            ColSpec("double", "gflops"),
        ]
        return ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *self.input_shape))]),
            outputs=Schema(outputs),
            params=ParamSchema([ParamSpec(THRESHOLD_PARAM, "double", self.threshold)]),
        )


def log_servable_model(
    model: MultiExitNet,
    cfg: JobConfig,
    data: DataSplits,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
) -> ModelInfo:
    """Log the trained `model` of job `cfg` (trained on `data`) in the active MLflow run as a
    servable early-exit model; with `registered_model_name`, register it too.

    Leaves `model` as it is (a CPU copy is saved). The input example is two test images.
    """
    network = copy.deepcopy(model).cpu().eval()
    shape = (data.in_channels, data.image_size, data.image_size)
    spec = ServingSpec(
        input_shape=shape,
        mean=tuple(data.mean),
        std=tuple(data.std),
        exit_gflops=tuple(exit_gflops(network, shape)),
        threshold=cfg.train.exit_threshold,
        precision=cfg.train.precision,
        batch_size=cfg.train.batch_size,
    )
    return Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],
        registered_model_name=registered_model_name,
        metadata={METADATA_KEY: asdict(spec)},
        network=network,
        spec=spec,
        input_example=data.test.images[:2].cpu().numpy(),
    )


def usage_lines(model_uri: str, tracking_uri: str) -> list[str]:
    """How to use a logged model: load it in Python, and serve it over HTTP (`tracking_uri`
    as it may be shown: with any password masked)."""
    return [
        f'load in Python: mlflow.pyfunc.load_model("{model_uri}").predict(images)'
        "  # uint8 [N, C, H, W]; params={'threshold': 0.8}",
        f"serve: MLFLOW_TRACKING_URI={tracking_uri} mlflow models serve -m {model_uri} "
        "--env-manager local --host 127.0.0.1 --port 5001",
    ]


def save_model(
    path: str,
    mlflow_model: Model,
    *,
    network: MultiExitNet,
    spec: ServingSpec,
    input_example: np.ndarray,
) -> None:
    """The flavor's save (what ``Model.log`` calls): the pytorch flavor with the trainer
    package as code, then this module as the python_function flavor's loader."""
    mlflow.pytorch.save_model(
        network,
        path,
        mlflow_model=mlflow_model,
        code_paths=[str(_TRAINER_DIR)],
        serialization_format="pickle",
        signature=spec.signature(),
        input_example=input_example,
        pip_requirements=[_pinned(name) for name in _REQUIREMENTS],
    )
    code = mlflow_model.flavors[pyfunc.FLAVOR_NAME][pyfunc.CODE]
    del mlflow_model.flavors[pyfunc.FLAVOR_NAME]
    pyfunc.add_to_model(
        mlflow_model,
        loader_module=__name__,
        code=code,
        conda_env="conda.yaml",
        python_env="python_env.yaml",
        model_config={"device": None},
    )
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


def _pinned(name: str) -> str:
    return f"{name}=={version(name).split('+')[0]}"  # drop a local tag such as +cu130


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> EarlyExitModel:
    """The python_function loader: `path` is the model directory. ``model_config={"device":
    "cpu"}`` at load time picks the device (default: CUDA when available)."""
    device = (model_config or {}).get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    metadata = Model.load(os.path.join(path, MLMODEL_FILE_NAME)).metadata
    spec = ServingSpec.from_dict(metadata[METADATA_KEY])
    network = mlflow.pytorch.load_model(path, map_location="cpu")
    return EarlyExitModel(network, spec, torch.device(device))


class EarlyExitModel:
    """What ``mlflow.pyfunc.load_model`` wraps: predict(uint8 images, params) -> DataFrame."""

    def __init__(self, network: MultiExitNet, spec: ServingSpec, device: torch.device) -> None:
        # channels_last on every device: oneDNN's CPU convolutions run faster on it too
        # (docs/serving.md, "What the served model runs")
        self.network = network.to(device, memory_format=torch.channels_last).eval()
        self.spec = spec
        self.device = device
        self.autocast_dtype = autocast_dtype(spec.precision, device)
        self.scale, self.shift = pixel_affine(spec.mean, spec.std, device)
        self.gflops = torch.tensor(spec.exit_gflops, dtype=torch.float64)

    def get_raw_model(self) -> MultiExitNet:
        """The network (``PyFuncModel.get_raw_model()``), on this model's device."""
        return self.network

    def predict(self, data: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        given = (params or {}).get(THRESHOLD_PARAM)  # None (JSON null) means the default
        threshold = self.spec.threshold if given is None else float(given)
        if not 0.0 < threshold <= 1.0:
            raise MlflowException.invalid_parameter_value(
                f"`{THRESHOLD_PARAM}` is {threshold}, but must be in (0, 1]"
            )
        images = torch.as_tensor(np.asarray(data))
        decisions = [self._decide(chunk, threshold) for chunk in images.split(self.spec.batch_size)]
        predicted, confidence, exit_index = (
            torch.cat(d).cpu() for d in zip(*decisions, strict=True)
        )
        return pd.DataFrame(
            {
                "class": predicted.numpy(),
                "confidence": confidence.numpy(),
                "exit": exit_index.numpy() + 1,
                "gflops": self.gflops[exit_index].numpy(),
            }
        )

    def _decide(self, images: torch.Tensor, threshold: float) -> ExitDecision:
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype, enabled=dtype is not None):
            return early_exit(self.network, normalise(x, self.scale, self.shift), threshold)
