"""From images to logits with a trained module: the path evaluation, prediction and export share.

Images go through ``data.transforms.to_input`` with the checkpoint's own normalisation, the same
function the training loaders apply, so a file predicted here gives the same tensor as it does in
the data module (the decoder is shared too: ``data.sources.decode_image``).
"""

from __future__ import annotations

import numpy as np
import torch

from cifar_lightning.data.transforms import to_input
from cifar_lightning.errors import UserError
from cifar_lightning.module import ClassifierModule


def _uint8_nchw(images: np.ndarray) -> torch.Tensor:
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # torch.from_numpy warns on read-only memory (decoded PIL images)
        images = images.copy()
    return torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) to float (N, 3, H, W) in [0, 1]: what an exported model takes."""
    return _uint8_nchw(images).float().mul_(1.0 / 255)


def model_input(module: ClassifierModule, images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) to the normalised float input of ``module``, as its data module made it."""
    return to_input(_uint8_nchw(images), module.hparams.norm_mean, module.hparams.norm_std)


@torch.no_grad()
def predict_logits(
    module: ClassifierModule,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    tta: str = "none",
) -> torch.Tensor:
    """Logits (N, C) on the CPU for uint8 images (N, H, W, 3), plain or with a TTA mode."""
    module = module.to(device).eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = model_input(module, images[start : start + batch_size]).to(device)  # (B, 3, H, W)
        out.append(module.tta_logits(x, tta).float().cpu())
    return torch.cat(out) if out else torch.empty(0, module.hparams.num_classes)


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, with a ``UserError`` for a malformed name or a missing accelerator."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device {name!r} ({err}). Use e.g. cpu, cuda or cuda:1.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this machine has no CUDA GPU. Use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} asked for, but MPS is not available here. Use --device cpu.")
    return device
