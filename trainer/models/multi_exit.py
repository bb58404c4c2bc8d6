"""The multi-exit network: a backbone with an exit head after each block in `model.exits`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from trainer.config import BLOCKS_PER_ARCH, ModelConfig
from trainer.models.heads import ExitHead, ProjectionHead, TeacherAttention, build_exit_head
from trainer.models.layers import StemKind
from trainer.models.registry import BACKBONES, Backbone


class MultiExitOutput(NamedTuple):
    logits: torch.Tensor  # [K, B, num_classes], shallowest exit first
    features: torch.Tensor  # [K, B, D] pooled features, D = channels of the last block
    # [K-1, B, D] exits 1..K-1's features through their projection heads: in training mode,
    # when the model has them (the correlation loss); else None.
    projections: torch.Tensor | None = None
    # [B, K, K] MATE's teacher scores from the weight network: in training mode, when the
    # model has one; else None.
    teacher_scores: torch.Tensor | None = None


class MultiExitNet(nn.Module):
    """Runs the stem and every block once, reading out an exit after each block in `exits`.

    With `projection_heads`, exits 1..K-1 each get a :class:`ProjectionHead`; with
    `weight_network`, the exits' features feed MATE's :class:`TeacherAttention`. Both are
    trained and checkpointed with the model but run only in training mode.
    """

    def __init__(
        self,
        backbone: Backbone,
        exits: Sequence[int],
        *,
        num_classes: int,
        head_width: float,
        projection_heads: bool = False,
        weight_network: bool = False,
    ) -> None:
        super().__init__()
        assert exits and exits[-1] == len(backbone.blocks), "the last exit is the last block"
        self.backbone = backbone
        self.exits = list(exits)  # 1-based block indices, ascending
        self.num_exits = len(self.exits)
        self.feature_dim = backbone.block_channels[-1]
        self.heads = nn.ModuleList(
            build_exit_head(backbone, b, num_classes=num_classes, head_width=head_width)
            for b in self.exits
        )
        self._head_index = {b: k for k, b in enumerate(self.exits)}
        self.projectors = None
        if projection_heads and self.num_exits > 1:
            self.projectors = nn.ModuleList(
                ProjectionHead(self.feature_dim) for _ in range(self.num_exits - 1)
            )
        self.weight_network = TeacherAttention(self.feature_dim) if weight_network else None

    def stages(self) -> Iterator[tuple[nn.Module, ExitHead | None]]:
        """Each block in order, with the exit head read out after it (None where there is none)."""
        for index, block in enumerate(self.backbone.blocks, start=1):
            k = self._head_index.get(index)
            yield block, None if k is None else self.heads[k]

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        """x: [B, C_in, H, W] (any memory format) -> logits [K, B, classes], features [K, B, D]
        and, in training mode, projections [K-1, B, D] and teacher scores [B, K, K] where the
        model has projection heads and a weight network."""
        h = self.backbone.stem(x)
        logits, pooled = [], []
        for block, head in self.stages():
            h = block(h)
            if head is not None:
                z, f = head(h)
                logits.append(z)
                pooled.append(f)
        features = torch.stack(pooled)
        projections = scores = None
        if self.projectors is not None and self.training:
            pairs = zip(self.projectors, features[:-1], strict=True)
            projections = torch.stack([project(f) for project, f in pairs])
        if self.weight_network is not None and self.training:
            scores = self.weight_network(features)
        return MultiExitOutput(torch.stack(logits), features, projections, scores)


def _resolve_stem(stem: str, image_size: int) -> StemKind:
    """`model.stem` "auto" -> "cifar" below 64 px (keeps small images whole), else "imagenet"."""
    if stem != "auto":
        return stem
    return "cifar" if image_size < 64 else "imagenet"


def create_model(
    cfg: ModelConfig,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    projection_heads: bool = False,
    weight_network: bool = False,
) -> MultiExitNet:
    """Build the backbone `cfg.arch` with exits after the blocks `cfg.exits` (and projection
    heads on exits 1..K-1 for the correlation loss, MATE's attention weight network)."""
    assert cfg.exits is not None  # ModelConfig resolves the default placement
    backbone = BACKBONES[cfg.arch](
        in_channels=in_channels, stem=_resolve_stem(cfg.stem, image_size)
    )
    assert len(backbone.blocks) == BLOCKS_PER_ARCH[cfg.arch], cfg.arch
    return MultiExitNet(
        backbone,
        cfg.exits,
        num_classes=num_classes,
        head_width=cfg.head_width,
        projection_heads=projection_heads,
        weight_network=weight_network,
    )
