"""Exit heads: what turns a block's feature map into pooled features and logits.

Intermediate heads follow BYOT (https://arxiv.org/abs/1905.08094) and EED: 3x3 stride-2
conv-BN-ReLU layers bring the block's map to the final block's resolution, one per stride-2
block still ahead, each as wide as that block's 3x3 convs times `head_width`, so an exit costs
less than the blocks it skips and cumulative FLOPs grow with depth. An exit already at the
final resolution gets one 1x1 conv-BN-ReLU instead (a 3x3 one from ResNet-50's 2048 channels
would cost more than the bottleneck it skips). A last 1x1 conv-BN-ReLU lifts the map to the
final block's channels D, so every exit's features live in the same D-dim space.

Projection heads (the correlation term) and MATE's attention weight network serve only the
training loss: they are not part of the anytime-inference path, so they are absent from
`exit{k}/gflops`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.layers import conv_bn_relu, init_weights
from trainer.models.registry import Backbone


class ExitHead(nn.Module):
    """body -> global average pool -> features [B, D] -> linear -> logits [B, num_classes]."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.fc = nn.Linear(feature_dim, num_classes)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C_block, H, W] -> (logits [B, num_classes], features [B, D])."""
        features = torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)
        return self.fc(features), features


def build_exit_head(
    backbone: Backbone, block: int, *, num_classes: int, head_width: float
) -> ExitHead:
    """The head for an exit after `block` (1-based); after the last block it is just pool + fc."""
    feature_dim = backbone.block_channels[-1]
    if block == len(backbone.blocks):
        return ExitHead(nn.Identity(), feature_dim, num_classes)
    ahead = range(block, len(backbone.blocks))  # 0-based indices of the blocks after `block`
    # (width, kernel, stride) per conv: a 3x3/2 per downsampling block ahead, else one 1x1/1
    # at the last block's width (an exit in the final stage still gets a hidden layer).
    steps = [(backbone.block_widths[j], 3, 2) for j in ahead if backbone.block_strides[j] == 2]
    steps = steps or [(backbone.block_widths[-1], 1, 1)]
    layers: list[nn.Module] = []
    channels = backbone.block_channels[block - 1]
    for width, kernel, stride in steps:
        hidden = max(8, round(width * head_width))
        layers.append(conv_bn_relu(channels, hidden, kernel, stride))
        channels = hidden
    layers.append(conv_bn_relu(channels, feature_dim, 1))
    return ExitHead(nn.Sequential(*layers), feature_dim, num_classes)


class ProjectionHead(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear, D -> D -> D: the trainable MLP head DLKD
    (https://github.com/ifding/DLKD, helper/losses.py CorrLoss) puts on the student's features
    before its similarity distillation, with BYOL's MLPHead layout and widths equal to D."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, D] -> projected [B, D]; training needs B >= 2 (BatchNorm)."""
        return self.net(features)


class TeacherAttention(nn.Module):
    """MATE's weight network (the paper's overview figure, panel c: the exits' pooled feature
    vectors -> self-attention -> weights), built as OKDDip builds its per-peer ensemble
    targets (https://github.com/DefangChen/OKDDip, models/model_cifar/resnet_GL.py @ c6a05de):
    shared bias-free query and key projections Linear(D, D // 8) of every exit's features,
    and teacher j's score for exit k is q_j . k_k, unscaled. PyTorch's default Linear
    initialisation, as there."""

    def __init__(self, dim: int, reduction: int = 8) -> None:
        super().__init__()
        width = max(1, dim // reduction)
        self.query = nn.Linear(dim, width, bias=False)
        self.key = nn.Linear(dim, width, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [K, B, D] -> scores [B, J=K, K]; softmax over the last axis gives teacher
        j's weights over the exits (`trainer.losses.teacher_weights`)."""
        return torch.einsum("jbp,kbp->bjk", self.query(features), self.key(features))
