"""Small CNNs from the classic PyTorch CIFAR-10 tutorials."""

from __future__ import annotations

from torch import nn

from cifar_lightning.models.registry import register_model


@register_model(family="simple", source="Sequential CNN tutorial (conv5x5 x3 + 2 linear)")
def simple_cnn(*, num_classes: int = 10) -> nn.Sequential:
    """Three 5x5 conv + max-pool stages, then 1024->64->classes: 145,578 parameters."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2),
        nn.MaxPool2d(2),  # (B, 32, 16, 16)
        nn.Conv2d(32, 32, 5, padding=2),
        nn.MaxPool2d(2),  # (B, 32, 8, 8)
        nn.Conv2d(32, 64, 5, padding=2),
        nn.MaxPool2d(2),  # (B, 64, 4, 4)
        nn.Flatten(),
        nn.Linear(1024, 64),
        nn.Linear(64, num_classes),
    )
