"""Small building blocks shared by several families: conv stacks, stages and initialisation."""

from __future__ import annotations

from typing import Callable

from torch import nn


def conv3x3_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 'same' conv (with bias, as in the tutorials and VGG), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def make_stage(
    block: Callable[[int, int, int], nn.Module], in_planes: int, planes: int, n: int, stride: int, expansion: int = 1
) -> tuple[nn.Sequential, int]:
    """``n`` residual blocks, the first with ``stride``; returns the stage and its output width."""
    layers = []
    for s in [stride] + [1] * (n - 1):
        layers.append(block(in_planes, planes, s))
        in_planes = planes * expansion
    return nn.Sequential(*layers), in_planes


def init_kaiming_(model: nn.Module) -> None:
    """He-normal conv weights (fan-out, ReLU gain; He et al. 2015, arXiv:1502.01852), zero conv biases.

    Linear and BatchNorm layers keep PyTorch's defaults (uniform fan-in, unit scale, zero shift).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
