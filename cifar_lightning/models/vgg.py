"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks
for Large-Scale Image Recognition", arXiv:1409.1556; BN from Ioffe & Szegedy 2015).

CIFAR variant as in kuangliu/pytorch-cifar: the ImageNet conv stacks unchanged, but after the
five pools a 32x32 image is 1x1x512, so the three 4096-wide linear layers become one
512 -> classes layer.
"""

from __future__ import annotations

import torch
from torch import nn

from cifar_lightning.models.layers import conv3x3_bn_relu
from cifar_lightning.models.registry import register_model

_SOURCE = "Simonyan & Zisserman 2015 (arXiv:1409.1556) with BN, CIFAR variant as in kuangliu/pytorch-cifar"

# Conv widths per configuration (tables A, B, D, E of the paper); "M" is a 2x2 max-pool.
_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG conv stack (3x3 conv + BN + ReLU, 2x2 max-pools) and one linear classifier.

    Args:
        config: ``"vgg11"``, ``"vgg13"``, ``"vgg16"`` or ``"vgg19"``.
        num_classes: number of output logits.
    """

    def __init__(self, config: str = "vgg16", num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in _CONFIGS[config]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv3x3_bn_relu(channels, int(v)))
                channels = int(v)
        self.features = nn.Sequential(*layers)  # (B, 512, 1, 1) for 32x32 inputs
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model(family="vgg", source=_SOURCE)
def vgg11(*, num_classes: int = 10, **kwargs) -> VGG:
    """VGG-11 with BN (arXiv:1409.1556), CIFAR variant: 9,231,114 parameters. Args: as :class:`VGG`."""
    return VGG("vgg11", num_classes=num_classes, **kwargs)


@register_model(family="vgg", source=_SOURCE)
def vgg13(*, num_classes: int = 10, **kwargs) -> VGG:
    """VGG-13 with BN (arXiv:1409.1556), CIFAR variant: 9,416,010 parameters. Args: as :class:`VGG`."""
    return VGG("vgg13", num_classes=num_classes, **kwargs)


@register_model(family="vgg", source=_SOURCE)
def vgg16(*, num_classes: int = 10, **kwargs) -> VGG:
    """VGG-16 with BN (arXiv:1409.1556), CIFAR variant: 14,728,266 parameters. Args: as :class:`VGG`."""
    return VGG("vgg16", num_classes=num_classes, **kwargs)


@register_model(family="vgg", source=_SOURCE)
def vgg19(*, num_classes: int = 10, **kwargs) -> VGG:
    """VGG-19 with BN (arXiv:1409.1556), CIFAR variant: 20,040,522 parameters. Args: as :class:`VGG`."""
    return VGG("vgg19", num_classes=num_classes, **kwargs)
