"""Building blocks shared by the backbones and the exit heads."""

from __future__ import annotations

from typing import Literal

from torch import nn

StemKind = Literal["cifar", "imagenet"]


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1
) -> nn.Sequential:
    """Conv (no bias: BN follows) -> BN -> ReLU, "same" padding for odd kernels."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def make_stem(kind: StemKind, in_channels: int, width: int) -> nn.Sequential:
    """cifar: 3x3 conv, stride 1 (keeps small images whole); imagenet: 7x7/2 conv + 3x3/2 max-pool
    (H -> H/4)."""
    if kind == "cifar":
        return conv_bn_relu(in_channels, width, 3)
    return nn.Sequential(
        *conv_bn_relu(in_channels, width, 7, stride=2),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


def init_weights(module: nn.Module) -> None:
    """torchvision's ResNet init: Kaiming-normal (fan_out) convs, BN as identity; use with
    ``Module.apply``. Linear layers keep PyTorch's default."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
