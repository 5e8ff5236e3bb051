"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
arXiv:1801.04381), CIFAR variant of kuangliu/pytorch-cifar.

For 32x32 inputs the stem conv has stride 1 and the second stage (24 channels) stride 1 instead
of 2, so the final map is 4x4 rather than 1x1. As in kuangliu's version, a stride-1 block that
changes the width gets a 1x1 conv + BN shortcut (the paper has no shortcut there); this gives its
2,296,922 parameters. The activation is the paper's ReLU6 (kuangliu uses ReLU; no parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_lightning.models.registry import register_model

# (expansion t, output channels c, blocks n, first stride s), table 2 of the paper with the
# CIFAR strides.
_CONFIG = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the paper
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    padding = kernel_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion -> ReLU6 -> 3x3 depthwise -> ReLU6 -> linear 1x1 projection, plus shortcut."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = expansion * in_planes
        self.stride = stride
        self.expand = _conv_bn(in_planes, hidden)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = _conv_bn(hidden, out_planes)
        self.shortcut = None
        if stride == 1:
            self.shortcut = nn.Identity() if in_planes == out_planes else _conv_bn(in_planes, out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.expand(x))
        out = F.relu6(self.depthwise(out))
        out = self.project(out)  # linear bottleneck: no activation
        return out if self.shortcut is None else out + self.shortcut(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (width multiplier 1)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 32, 3)  # stride 1 for CIFAR (2 in the paper)
        blocks: list[nn.Module] = []
        in_planes = 32
        for expansion, out_planes, n, stride in _CONFIG:
            for s in [stride] + [1] * (n - 1):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, s))
                in_planes = out_planes
        self.blocks = nn.Sequential(*blocks)  # (B, 320, 4, 4)
        self.head = _conv_bn(320, 1280)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu6(self.stem(x)))
        out = F.relu6(self.head(out))  # (B, 1280, 4, 4)
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model(
    family="mobilenet",
    source="Sandler et al. 2018 (arXiv:1801.04381), CIFAR variant as in kuangliu/pytorch-cifar",
)
def mobilenetv2(*, num_classes: int = 10, **kwargs) -> MobileNetV2:
    """MobileNetV2 (arXiv:1801.04381), CIFAR variant: 2,296,922 parameters for 10 classes.

    Args:
        num_classes: number of output logits.
        **kwargs: forwarded to :class:`MobileNetV2`.
    """
    return MobileNetV2(num_classes=num_classes, **kwargs)
