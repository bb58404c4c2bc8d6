"""A small 4-block conv net for 8x8 digits, tests and CPU demos."""

from __future__ import annotations

from torch import nn

from trainer.models.layers import StemKind, conv_bn_relu, make_stem
from trainer.models.registry import Backbone, register_backbone

_WIDTHS = (16, 32, 64, 64)
_STRIDES = (1, 2, 2, 1)  # 8x8 input: 8 -> 8 -> 4 -> 2 -> 2; 32x32: 32 -> 32 -> 16 -> 8 -> 8


@register_backbone("convnet")
def convnet(*, in_channels: int, stem: StemKind) -> Backbone:
    """VGG-style blocks of two 3x3 conv-BN-ReLU; the first conv of a block carries its stride.

    Two convs per block keep each block dearer than the exit head that stands in for it.
    """
    blocks = []
    channels = _WIDTHS[0]
    for width, stride in zip(_WIDTHS, _STRIDES, strict=True):
        blocks.append(
            nn.Sequential(conv_bn_relu(channels, width, stride=stride), conv_bn_relu(width, width))
        )
        channels = width
    return Backbone(
        make_stem(stem, in_channels, _WIDTHS[0]),
        blocks,
        block_channels=_WIDTHS,
        block_strides=_STRIDES,
        block_widths=_WIDTHS,
    )
