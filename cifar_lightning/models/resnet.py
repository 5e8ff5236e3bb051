"""ResNet for CIFAR (He et al. 2016, "Deep Residual Learning for Image Recognition",
arXiv:1512.03385), in the ImageNet-style widths 64/128/256/512 adapted to 32x32 inputs:
a 3x3 stride-1 stem, no max-pool, 1x1 projection shortcuts and a 4x4 global average pool.
"""

from __future__ import annotations

import torch
from torch import nn

from cifar_lightning.models.layers import make_stage
from cifar_lightning.models.registry import register_model

_SOURCE = "He et al. 2016 (arXiv:1512.03385), CIFAR variant as in kuangliu/pytorch-cifar"


class BasicBlock(nn.Module):
    """Two 3x3 convs. ``shortcut`` replaces the default projection (the CIFAR ResNets pass option A)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut if shortcut is not None else _projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    # Identity when shapes match, otherwise a 1x1 conv + BN projection (the paper's option B).
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    """CIFAR ResNet with four stages of widths 64, 128, 256, 512.

    Args:
        block: ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50 and deeper).
        num_blocks: blocks in each of the four stages.
        num_classes: number of output logits.
    """

    def __init__(self, block: type[nn.Module], num_blocks: list[int], num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        width = 64
        self.layer1, width = make_stage(block, width, 64, num_blocks[0], 1, block.expansion)
        self.layer2, width = make_stage(block, width, 128, num_blocks[1], 2, block.expansion)
        self.layer3, width = make_stage(block, width, 256, num_blocks[2], 2, block.expansion)
        self.layer4, width = make_stage(block, width, 512, num_blocks[3], 2, block.expansion)
        self.pool = nn.AdaptiveAvgPool2d(1)  # 4x4 -> 1x1 for 32x32 inputs
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))  # (B, 64, 32, 32)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (B, 512*e, 4, 4)
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model(family="resnet", source=_SOURCE)
def resnet18(*, num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-18 (arXiv:1512.03385), CIFAR variant: 11,173,962 parameters. Args: as :class:`ResNet`."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


@register_model(family="resnet", source=_SOURCE)
def resnet34(*, num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-34 (arXiv:1512.03385), CIFAR variant: 21,282,122 parameters. Args: as :class:`ResNet`."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


@register_model(family="resnet", source=_SOURCE)
def resnet50(*, num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-50 (arXiv:1512.03385), CIFAR variant: 23,520,842 parameters. Args: as :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


@register_model(family="resnet", source=_SOURCE)
def resnet101(*, num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-101 (arXiv:1512.03385), CIFAR variant: 42,512,970 parameters. Args: as :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, **kwargs)


@register_model(family="resnet", source=_SOURCE)
def resnet152(*, num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-152 (arXiv:1512.03385), CIFAR variant: 58,156,618 parameters. Args: as :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, **kwargs)
