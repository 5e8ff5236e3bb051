"""Wide ResNet (Zagoruyko & Komodakis 2016, "Wide Residual Networks", arXiv:1605.07146).

WRN-d-k: a 3x3 stem to 16 channels, three stages of (d - 4) / 6 pre-activation blocks at widths
16k, 32k and 64k, a final BN-ReLU, global average pooling and one linear layer. Convolutions have
no bias and the shortcut of a widening block is a 1x1 conv, as in the authors' code; WRN-28-10
has the paper's 36.5M parameters.
"""

from __future__ import annotations

from cifar_lightning.models.preact_resnet import PreActResNet
from cifar_lightning.models.registry import register_model


class WideResNet(PreActResNet):
    """WRN-``depth``-``widen_factor``; ``dropout`` sits between the two convs of each block (0.3 in
    the paper's dropout runs)."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0, num_classes: int = 10) -> None:
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        super().__init__([n, n, n], widths, stem_width=16, dropout=dropout, num_classes=num_classes)


@register_model(family="wide_resnet", source="Zagoruyko & Komodakis 2016 (arXiv:1605.07146), WRN-28-10")
def wrn28_10(*, num_classes: int = 10, dropout: float = 0.0, **kwargs) -> WideResNet:
    """WRN-28-10 (arXiv:1605.07146): 36,479,194 parameters for 10 classes.

    Args:
        num_classes: number of output logits.
        dropout: dropout probability between the convs of every block (the paper uses 0.3).
        **kwargs: forwarded to :class:`WideResNet`.
    """
    return WideResNet(depth=28, widen_factor=10, dropout=dropout, num_classes=num_classes, **kwargs)


@register_model(family="wide_resnet", source="Zagoruyko & Komodakis 2016 (arXiv:1605.07146), WRN-16-8")
def wrn16_8(*, num_classes: int = 10, dropout: float = 0.0, **kwargs) -> WideResNet:
    """WRN-16-8 (arXiv:1605.07146): two blocks a stage at widths 128/256/512, the network of
    davda54/sam's SAM and ASAM runs.

    Args:
        num_classes: number of output logits.
        dropout: dropout probability between the convs of every block.
        **kwargs: forwarded to :class:`WideResNet`.
    """
    return WideResNet(depth=16, widen_factor=8, dropout=dropout, num_classes=num_classes, **kwargs)
