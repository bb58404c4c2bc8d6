"""Backbone registry: ``@register_backbone("name")`` on one short builder per variant (timm style).

A backbone is a stem plus a flat list of blocks; it knows nothing about exits. Exit heads
attach after any block (``model.exits`` holds 1-based block indices).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from torch import nn

from trainer.models.layers import StemKind, init_weights


class Backbone(nn.Module):
    """``stem`` then ``blocks`` in order, with per-block metadata the exit heads are built from.

    block_channels: output channels of each block.
    block_strides: spatial stride of each block (2 where it halves H and W, else 1).
    block_widths: channels of each block's 3x3 convs (the bottleneck width for ResNet-50);
        exit heads mirror these to cost less than the blocks they skip.
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        *,
        block_channels: Sequence[int],
        block_strides: Sequence[int],
        block_widths: Sequence[int],
    ) -> None:
        super().__init__()
        assert len(blocks) == len(block_channels) == len(block_strides) == len(block_widths)
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.block_channels = list(block_channels)
        self.block_strides = list(block_strides)
        self.block_widths = list(block_widths)
        self.apply(init_weights)


class BackboneBuilder(Protocol):
    def __call__(self, *, in_channels: int, stem: StemKind) -> Backbone: ...


BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Add the decorated builder to :data:`BACKBONES` under `name`."""

    def register(builder: BackboneBuilder) -> BackboneBuilder:
        if name in BACKBONES:
            raise ValueError(f"backbone `{name}` is already registered")
        BACKBONES[name] = builder
        return builder

    return register
