"""``dainet7``: the "DaiNet" of a community PyTorch CIFAR-10 tutorial, six 3x3 conv layers and
one linear layer. Each layer is conv -> ReLU -> BatchNorm (BN after the activation, as the
tutorial wrote it), with dropout growing from 0.1 to 0.5 with depth.
"""

from __future__ import annotations

import torch
from torch import nn

from cifar_lightning.models.registry import register_model

# (in, out, max-pool after, dropout after) for the six conv layers.
_LAYERS = [
    (3, 64, False, 0.1),
    (64, 64, True, 0.1),  # -> (B, 64, 16, 16)
    (64, 128, False, 0.0),
    (128, 128, True, 0.5),  # -> (B, 128, 8, 8)
    (128, 256, False, 0.5),
    (256, 256, False, 0.0),
]


def _layer(in_channels: int, out_channels: int, pool: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(out_channels),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class DaiNet7(nn.Module):
    """Six conv layers (64, 64, 128, 128, 256, 256), an 8x8 average pool and one linear layer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(*(_layer(*spec) for spec in _LAYERS))
        self.pool = nn.AvgPool2d(8)  # (B, 256, 8, 8) -> (B, 256, 1, 1)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model(family="dainet", source="DaiNet, community PyTorch CIFAR-10 tutorial (6 conv + 1 linear)")
def dainet7(*, num_classes: int = 10, **kwargs) -> DaiNet7:
    """Seven-layer DaiNet: 1,149,770 parameters for 10 classes.

    Args:
        num_classes: number of output logits.
        **kwargs: forwarded to :class:`DaiNet7`.
    """
    return DaiNet7(num_classes=num_classes, **kwargs)
