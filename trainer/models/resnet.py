"""ResNets as flat block lists: ResNet-18/34/50 and He et al.'s CIFAR ResNets 20/32/56/110.

ResNet-18/34/50 take a CIFAR (3x3/1) or ImageNet (7x7/2 + pool) stem; torchvision's ResNet
bakes in the ImageNet stem, so only its block classes are reused here, imported when a ResNet
is built: importing torchvision costs every process about two seconds of CPU (its models
import torch._dynamo), which a trial of another backbone, or Tune's driver, need not pay.

resnet20/32/56/110 (https://arxiv.org/abs/1512.03385, §4.2): a 3x3 conv to 16 channels, then
3 stages of n basic blocks at widths 16, 32, 64 (6n + 2 layers with weights). Their shortcuts
are the paper's option A: identity, subsampled and zero-padded in channels where the shape
changes. The paper's CIFAR results use option A, so these models match its table (resnet20:
0.27 M parameters, 40.6 M multiply-adds per 32x32 image); option B (1x1 projections, as in
the ImageNet ResNets) would add parameters and FLOPs the paper's CIFAR numbers do not have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.layers import StemKind, make_stem
from trainer.models.registry import Backbone, register_backbone

Shortcut = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride)
BlockName = Literal["BasicBlock", "Bottleneck"]  # torchvision's block classes


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Option B: 1x1 conv (strided) + BN."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


class ZeroPadShortcut(nn.Module):
    """Option A: [B, C, H, W] -> [B, C + 2p, H/2, W/2], every other pixel, the new channels 0."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        assert stride == 2 and (out_channels - in_channels) % 2 == 0
        self.pad = (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


def _resnet(
    block_name: BlockName,
    depths: tuple[int, ...],
    in_channels: int,
    stem: StemKind,
    *,
    planes: tuple[int, ...] = (64, 128, 256, 512),
    shortcut: Shortcut = projection_shortcut,
) -> Backbone:
    """Stages of `depths` blocks at `planes` widths; `shortcut` where a block changes shape."""
    from torchvision.models import resnet  # noqa: PLC0415  (see module doc)

    block = getattr(resnet, block_name)
    blocks: list[nn.Module] = []
    channels, strides, widths = [], [], []
    inplanes = planes[0]
    for stage, (width, depth) in enumerate(zip(planes, depths, strict=True)):
        out = width * block.expansion
        for i in range(depth):
            # Later stages halve H and W in their first block (on the 3x3 conv, ResNet v1.5).
            stride = 2 if stage > 0 and i == 0 else 1
            downsample = None
            if stride != 1 or inplanes != out:
                downsample = shortcut(inplanes, out, stride)
            blocks.append(block(inplanes, width, stride, downsample))
            channels.append(out)
            strides.append(stride)
            widths.append(width)
            inplanes = out
    return Backbone(
        make_stem(stem, in_channels, planes[0]),
        blocks,
        block_channels=channels,
        block_strides=strides,
        block_widths=widths,
    )


@register_backbone("resnet18")
def resnet18(*, in_channels: int, stem: StemKind) -> Backbone:
    """8 BasicBlocks, 512 output channels."""
    return _resnet("BasicBlock", (2, 2, 2, 2), in_channels, stem)


@register_backbone("resnet34")
def resnet34(*, in_channels: int, stem: StemKind) -> Backbone:
    """16 BasicBlocks, 512 output channels."""
    return _resnet("BasicBlock", (3, 4, 6, 3), in_channels, stem)


@register_backbone("resnet50")
def resnet50(*, in_channels: int, stem: StemKind) -> Backbone:
    """16 Bottlenecks, 2048 output channels."""
    return _resnet("Bottleneck", (3, 4, 6, 3), in_channels, stem)


def _cifar_resnet(n: int, in_channels: int, stem: StemKind) -> Backbone:
    """3n BasicBlocks at widths 16/32/64 with option-A shortcuts, 64 output channels."""
    return _resnet(
        "BasicBlock", (n, n, n), in_channels, stem, planes=(16, 32, 64), shortcut=ZeroPadShortcut
    )


@register_backbone("resnet20")
def resnet20(*, in_channels: int, stem: StemKind) -> Backbone:
    """9 BasicBlocks (n = 3)."""
    return _cifar_resnet(3, in_channels, stem)


@register_backbone("resnet32")
def resnet32(*, in_channels: int, stem: StemKind) -> Backbone:
    """15 BasicBlocks (n = 5)."""
    return _cifar_resnet(5, in_channels, stem)


@register_backbone("resnet56")
def resnet56(*, in_channels: int, stem: StemKind) -> Backbone:
    """27 BasicBlocks (n = 9)."""
    return _cifar_resnet(9, in_channels, stem)


@register_backbone("resnet110")
def resnet110(*, in_channels: int, stem: StemKind) -> Backbone:
    """54 BasicBlocks (n = 18)."""
    return _cifar_resnet(18, in_channels, stem)
