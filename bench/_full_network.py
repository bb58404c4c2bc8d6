"""The serving benchmark's baseline: always the whole network (normalise, stem, every block,
the last exit's head), as a single-exit deployment runs it, on the served model's raw network,
in its memory format and precision."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PyFuncModel
from torch.utils.flop_counter import FlopCounterMode

from trainer.models import MultiExitNet
from trainer.pixels import normalise, pixel_affine
from trainer.precision import autocast_dtype
from trainer.serving import METADATA_KEY, ServingSpec


class FullNetwork:
    """Always the whole network: normalise, stem, every block, the last exit's head; in the
    served model's memory format and precision, on its raw network."""

    def __init__(
        self,
        served: PyFuncModel,
        shape: tuple[int, ...],
        memory_format: torch.memory_format = torch.channels_last,
    ) -> None:
        self.network: MultiExitNet = served.get_raw_model()  # eval, channels_last
        if memory_format != torch.channels_last:
            self.network = copy.deepcopy(self.network).to(memory_format=memory_format)
        self.memory_format = memory_format
        self.device = next(self.network.parameters()).device  # the served model's
        self.spec = ServingSpec.from_dict(served.metadata.metadata[METADATA_KEY])
        self.scale, self.shift = pixel_affine(self.spec.mean, self.spec.std, self.device)
        self.dtype = autocast_dtype(self.spec.precision, self.device)
        with FlopCounterMode(display=False) as counter, torch.no_grad(), self.autocast():
            self.forward(self.inputs(np.zeros((1, *shape), dtype=np.uint8)))
        self.gflops = counter.get_total_flops() / 1e9

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).to(self.device).contiguous(memory_format=self.memory_format)
        return normalise(x, self.scale, self.shift)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.network.backbone.stem(x)
        for block in self.network.backbone.blocks:
            h = block(h)
        return self.network.heads[-1](h)[0]

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> pd.DataFrame:
        with self.autocast():
            classes = self.forward(self.inputs(images)).argmax(dim=-1).cpu().numpy()
        exit_ = self.network.num_exits
        return pd.DataFrame({"class": classes, "exit": exit_, "gflops": self.gflops})


def batches(images: np.ndarray, size: int) -> list[np.ndarray]:
    return [images[i : i + size] for i in range(0, len(images), size)]
