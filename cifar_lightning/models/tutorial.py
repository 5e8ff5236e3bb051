"""``mynet``: the plain conv-BN-ReLU network of the course tutorial this project grew from.

Four 3x3 conv layers (3 -> 64 -> 128, pool, 128 -> 64 -> 32, pool) and a wide two-layer
classifier; most of its 5.5M parameters sit in the 2592 -> 2048 linear layer. PyTorch's default
initialisation, as in the tutorial's code: with Xavier-uniform weights and zero biases instead,
the tutorial's recipe (SGD 0.1, momentum 0.9) stayed at chance (training loss ln 10) for three
epochs on CIFAR-10.
"""

from __future__ import annotations

import torch
from torch import nn

from cifar_lightning.models.layers import conv3x3_bn_relu
from cifar_lightning.models.registry import register_model


class MyNet(nn.Module):
    """Conv-BN-ReLU x4 with two padded max-pools, then 2592 -> 2048 -> classes (default init)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        # padding=1 on the pools: 32 -> 17 -> 9, so the classifier sees 32 * 9 * 9 = 2592 features.
        self.features = nn.Sequential(
            conv3x3_bn_relu(3, 64),
            conv3x3_bn_relu(64, 128),
            nn.MaxPool2d(2, padding=1),  # (B, 128, 17, 17)
            conv3x3_bn_relu(128, 64),
            conv3x3_bn_relu(64, 32),
            nn.MaxPool2d(2, padding=1),  # (B, 32, 9, 9)
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 9 * 9, 2048), nn.ReLU(inplace=True), nn.Linear(2048, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model(family="tutorial", source="Course tutorial network (conv-BN-ReLU x4, PyTorch default init)")
def mynet(*, num_classes: int = 10, **kwargs) -> MyNet:
    """The tutorial's ``MyNet``: 5,499,434 parameters for 10 classes.

    Args:
        num_classes: number of output logits.
        **kwargs: forwarded to :class:`MyNet`.
    """
    return MyNet(num_classes=num_classes, **kwargs)
