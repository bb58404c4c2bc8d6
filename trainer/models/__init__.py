"""Multi-exit backbones, exit heads, exit placement and FLOPs per exit."""

from trainer.models import convnet, resnet  # noqa: F401  (importing registers the backbones)
from trainer.models.flops import exit_gflops
from trainer.models.heads import ExitHead
from trainer.models.multi_exit import MultiExitNet, MultiExitOutput, create_model
from trainer.models.registry import BACKBONES, Backbone, register_backbone

__all__ = [
    "BACKBONES",
    "Backbone",
    "ExitHead",
    "MultiExitNet",
    "MultiExitOutput",
    "create_model",
    "exit_gflops",
    "register_backbone",
]
