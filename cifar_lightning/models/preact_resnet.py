"""Pre-activation ResNet (He et al. 2016, "Identity Mappings in Deep Residual Networks",
arXiv:1603.05027), CIFAR variant with the widths of kuangliu/pytorch-cifar: a 3x3 stem and four
stages of 64/128/256/512 channels.

Each block is BN -> ReLU -> conv -> BN -> ReLU -> conv plus the shortcut, so the identity path
carries no activation. As in the paper, the last unit is followed by an extra BN -> ReLU
before the pooling (otherwise the classifier would see an unnormalised sum). kuangliu's version
omits it; that is the whole difference from its 11,171,146 parameters (one 512-wide BN, 1,024).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from cifar_lightning.models.layers import init_kaiming_, make_stage
from cifar_lightning.models.registry import register_model


class PreActBlock(nn.Module):
    """Pre-activation basic block; ``dropout`` between the convs gives the wide-ResNet block."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            # The projection reads the pre-activated input, as in kuangliu's and the WRN authors' code.
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + skip


class PreActResNet(nn.Module):
    """Stem conv, stages of pre-activation blocks, final BN-ReLU, global average pool, linear.

    Args:
        num_blocks: blocks per stage.
        widths: channels per stage; every stage after the first halves the map.
        stem_width: channels of the 3x3 stem conv.
        dropout: dropout between the two convs of every block.
        num_classes: number of output logits.
    """

    def __init__(
        self,
        num_blocks: list[int],
        widths: list[int],
        stem_width: int = 64,
        dropout: float = 0.0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 3, padding=1, bias=False)
        stages, width = [], stem_width
        block = partial(PreActBlock, dropout=dropout)
        for i, (n, planes) in enumerate(zip(num_blocks, widths)):
            stage, width = make_stage(block, width, planes, n, 1 if i == 0 else 2)
            stages.append(stage)
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        init_kaiming_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(x))  # (B, widths[-1], H / 2^(stages-1), W / 2^(stages-1))
        out = torch.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model(
    family="preact_resnet",
    source="He et al. 2016 (arXiv:1603.05027), CIFAR widths of kuangliu/pytorch-cifar + final BN-ReLU",
)
def preact_resnet18(*, num_classes: int = 10, **kwargs) -> PreActResNet:
    """Pre-activation ResNet-18 (arXiv:1603.05027): 11,172,170 parameters for 10 classes.

    Args:
        num_classes: number of output logits.
        **kwargs: forwarded to :class:`PreActResNet` (e.g. ``dropout``).
    """
    return PreActResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes=num_classes, **kwargs)
