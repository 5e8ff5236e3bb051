"""Test-time augmentation: logits averaged over views of each image."""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

from cifar_lightning.errors import UserError

TTAMode = Literal["none", "flip", "flip_translate"]
TTA_MODES = ("none", "flip", "flip_translate")


def tta_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str) -> torch.Tensor:
    """Logits of ``forward`` averaged over test-time views of normalised images (B, 3, H, W).

    ``none`` is the plain forward pass; ``flip`` averages the image and its mirror, equally
    weighted; ``flip_translate`` (airbench94's level 2, arXiv:2404.00498) puts half on that pair
    and half on the pairs of the image shifted one pixel up-left and one pixel down-right (reflect
    padding), 6 views in all.
    """
    if mode not in TTA_MODES:
        raise UserError(f"unknown TTA mode {mode!r}. Valid modes: {', '.join(TTA_MODES)}")
    if mode == "none":
        return forward(x)

    def mirrored(views: torch.Tensor) -> torch.Tensor:
        # Averaged in float32: under bf16 autocast the logits have an 8-bit mantissa, and
        # averaging them there flips near-ties between classes.
        return 0.5 * (forward(views).float() + forward(views.flip(-1)).float())

    if mode == "flip":
        return mirrored(x)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    h, w = x.shape[-2:]
    shifted = 0.5 * (mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2:, 2:]))
    return 0.5 * mirrored(x) + 0.5 * shifted
