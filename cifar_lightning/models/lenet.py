"""LeNet-5 (LeCun et al. 1998, "Gradient-based learning applied to document recognition",
http://yann.lecun.com/exdb/publis/pdf/lecun-98.pdf) as the PyTorch CIFAR-10 tutorial writes it:
ReLU instead of tanh, max-pool instead of trainable subsampling, 3 input channels.
"""

from __future__ import annotations

import torch
from torch import nn

from cifar_lightning.models.registry import register_model


class LeNet5(nn.Module):
    """Two 5x5 conv + max-pool stages, then 400 -> 120 -> 84 -> classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # (B, 6, 14, 14)
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # (B, 16, 5, 5)
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model(
    family="lenet",
    source="LeCun et al. 1998 (LeNet-5), as in the PyTorch CIFAR-10 tutorial (ReLU, max-pool)",
)
def lenet5(*, num_classes: int = 10, **kwargs) -> LeNet5:
    """LeNet-5 for 32x32 RGB inputs: 62,006 parameters for 10 classes.

    Args:
        num_classes: number of output logits.
        **kwargs: forwarded to :class:`LeNet5`.
    """
    return LeNet5(num_classes=num_classes, **kwargs)
