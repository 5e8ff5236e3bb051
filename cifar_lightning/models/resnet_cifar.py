"""The CIFAR-10 ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition",
arXiv:1512.03385, section 4.2): ResNet-20/32/44/56/110.

A 3x3 conv to 16 channels, three stages of n basic blocks at widths 16, 32 and 64 on 32x32,
16x16 and 8x8 maps (depth 6n + 2), global average pooling and one linear layer. Every shortcut
is parameter-free (option A): where a stage halves the map and doubles the width, the identity
is subsampled with stride 2 and the new channels are zeros, so the model has exactly the
paper's 0.27M / 0.46M / 0.66M / 0.85M / 1.7M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_lightning.models.layers import init_kaiming_, make_stage
from cifar_lightning.models.registry import register_model
from cifar_lightning.models.resnet import BasicBlock

_SOURCE = "He et al. 2016 (arXiv:1512.03385) sec. 4.2, CIFAR ResNet with option-A shortcuts"


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad the channels, no parameters."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads from the last dim backwards: (W left, W right, H top, H bottom, C front, C back).
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


def _block(in_planes: int, planes: int, stride: int) -> BasicBlock:
    shortcut = nn.Identity() if stride == 1 and in_planes == planes else ZeroPadShortcut(in_planes, planes, stride)
    return BasicBlock(in_planes, planes, stride, shortcut=shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: stages of n basic blocks at widths 16, 32, 64.

    Args:
        depth: 6n + 2 layers (20, 32, 44, 56, 110, ...).
        num_classes: number of output logits.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1, width = make_stage(_block, 16, 16, n, 1)  # (B, 16, 32, 32)
        self.layer2, width = make_stage(_block, width, 32, n, 2)  # (B, 32, 16, 16)
        self.layer3, width = make_stage(_block, width, 64, n, 2)  # (B, 64, 8, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        init_kaiming_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model(family="resnet_cifar", source=_SOURCE)
def resnet20(*, num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-20 (arXiv:1512.03385, sec. 4.2): 269,722 parameters. Args: as :class:`CifarResNet`."""
    return CifarResNet(depth=20, num_classes=num_classes, **kwargs)


@register_model(family="resnet_cifar", source=_SOURCE)
def resnet32(*, num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-32 (arXiv:1512.03385, sec. 4.2): 464,154 parameters. Args: as :class:`CifarResNet`."""
    return CifarResNet(depth=32, num_classes=num_classes, **kwargs)


@register_model(family="resnet_cifar", source=_SOURCE)
def resnet44(*, num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-44 (arXiv:1512.03385, sec. 4.2): 658,586 parameters. Args: as :class:`CifarResNet`."""
    return CifarResNet(depth=44, num_classes=num_classes, **kwargs)


@register_model(family="resnet_cifar", source=_SOURCE)
def resnet56(*, num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-56 (arXiv:1512.03385, sec. 4.2): 853,018 parameters. Args: as :class:`CifarResNet`."""
    return CifarResNet(depth=56, num_classes=num_classes, **kwargs)


@register_model(family="resnet_cifar", source=_SOURCE)
def resnet110(*, num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-110 (arXiv:1512.03385, sec. 4.2): 1,727,962 parameters. Args: as :class:`CifarResNet`."""
    return CifarResNet(depth=110, num_classes=num_classes, **kwargs)
