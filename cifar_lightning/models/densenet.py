"""DenseNet-BC (Huang et al. 2017, "Densely Connected Convolutional Networks", arXiv:1608.06993),
DenseNet-121 layout (6, 12, 24, 16 bottleneck layers, growth rate 32, compression 0.5) adapted to
32x32 inputs as in kuangliu/pytorch-cifar: a single 3x3 stem conv to 2k channels, no max-pool,
and a 4x4 global average pool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_lightning.models.registry import register_model


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (4k channels), BN-ReLU-3x3 conv (k channels), concatenated to the input."""

    def __init__(self, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv that compresses the channels, then a 2x2 average pool."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(torch.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """DenseNet-BC for 32x32 inputs.

    Args:
        num_layers: dense layers per block.
        growth_rate: channels each dense layer adds (k).
        reduction: compression of the transitions (theta).
        num_classes: number of output logits.
    """

    def __init__(
        self,
        num_layers: tuple[int, ...] = (6, 12, 24, 16),
        growth_rate: int = 32,
        reduction: float = 0.5,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, n in enumerate(num_layers):
            for _ in range(n):
                stages.append(DenseLayer(planes, growth_rate))
                planes += growth_rate
            if i < len(num_layers) - 1:
                out_planes = int(planes * reduction)
                stages.append(Transition(planes, out_planes))
                planes = out_planes
        self.features = nn.Sequential(*stages)  # (B, 1024, 4, 4) for DenseNet-121
        self.bn = nn.BatchNorm2d(planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.features(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model(
    family="densenet",
    source="Huang et al. 2017 (arXiv:1608.06993), DenseNet-BC-121, CIFAR variant as in kuangliu/pytorch-cifar",
)
def densenet121(*, num_classes: int = 10, **kwargs) -> DenseNet:
    """DenseNet-121 (arXiv:1608.06993), CIFAR variant: 6,956,298 parameters for 10 classes.

    Args:
        num_classes: number of output logits.
        **kwargs: forwarded to :class:`DenseNet` (e.g. ``growth_rate``).
    """
    return DenseNet((6, 12, 24, 16), num_classes=num_classes, **kwargs)
