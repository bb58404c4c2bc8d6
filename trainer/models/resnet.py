"""ResNet-18/34/50 as flat block lists, with a CIFAR (3x3/1) or ImageNet (7x7/2 + pool) stem.

torchvision's ResNet bakes in the ImageNet stem, so only its block classes are reused here.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from trainer.models.layers import StemKind, make_stem
from trainer.models.registry import Backbone, register_backbone

_STAGE_PLANES = (64, 128, 256, 512)


def _resnet(
    block: type[BasicBlock | Bottleneck], depths: tuple[int, ...], in_channels: int, stem: StemKind
) -> Backbone:
    blocks: list[nn.Module] = []
    channels, strides, widths = [], [], []
    inplanes = _STAGE_PLANES[0]
    for stage, (planes, depth) in enumerate(zip(_STAGE_PLANES, depths, strict=True)):
        out = planes * block.expansion
        for i in range(depth):
            # Stages 2-4 halve H and W in their first block (on the 3x3 conv, ResNet v1.5).
            stride = 2 if stage > 0 and i == 0 else 1
            downsample = None
            if stride != 1 or inplanes != out:
                downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
            blocks.append(block(inplanes, planes, stride, downsample))
            channels.append(out)
            strides.append(stride)
            widths.append(planes)
            inplanes = out
    return Backbone(
        make_stem(stem, in_channels, _STAGE_PLANES[0]),
        blocks,
        block_channels=channels,
        block_strides=strides,
        block_widths=widths,
    )


@register_backbone("resnet18")
def resnet18(*, in_channels: int, stem: StemKind) -> Backbone:
    """8 BasicBlocks, 512 output channels."""
    return _resnet(BasicBlock, (2, 2, 2, 2), in_channels, stem)


@register_backbone("resnet34")
def resnet34(*, in_channels: int, stem: StemKind) -> Backbone:
    """16 BasicBlocks, 512 output channels."""
    return _resnet(BasicBlock, (3, 4, 6, 3), in_channels, stem)


@register_backbone("resnet50")
def resnet50(*, in_channels: int, stem: StemKind) -> Backbone:
    """16 Bottlenecks, 2048 output channels."""
    return _resnet(Bottleneck, (3, 4, 6, 3), in_channels, stem)
