"""Augmentation and normalisation: per image for the DataLoader, per batch for the tensor loader.

``normalize`` is the one normalisation of the project: both loaders, prediction, evaluation and
exported models apply it, and ``denormalize`` undoes it for display. Both loaders give
bit-identical images for the same crop and flip, because they run the same operations in the same
order.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from cifar_lightning.constants import IMAGE_SIZE
from cifar_lightning.errors import UserError

AugmentPreset = Literal["none", "standard", "flip", "translate", "autoaugment", "randaugment", "trivialaugment"]

#: Training augmentation presets: (padding in pixels, padding mode, horizontal flip). A preset
#: pads every side, takes a random crop of the original size, then flips with probability 1/2.
AUGMENT_PRESETS: dict[str, tuple[int, str, bool]] = {
    "none": (0, "constant", False),
    # He et al. 2016 (arXiv:1512.03385), section 4.2: zero-pad 4, random 32x32 crop, flip.
    "standard": (4, "constant", True),
    "flip": (0, "constant", True),
    # airbench94: reflect-pad 2 (translations of at most 2 pixels with no black border), flip.
    "translate": (2, "reflect", True),
    # A policy (``policies.py``) per image, then the standard crop and flip, as the policies'
    # papers train on CIFAR-10.
    "autoaugment": (4, "constant", True),
    "randaugment": (4, "constant", True),
    "trivialaugment": (4, "constant", True),
}

PolicyName = Literal["autoaugment", "randaugment", "trivialaugment"]
POLICIES = ("autoaugment", "randaugment", "trivialaugment")

Channels = Sequence[float] | torch.Tensor


def policy_transform(name: PolicyName, n: int = 2, m: int = 9) -> v2.Transform:
    """torchvision's per-image transform of policy ``name`` (``n``, ``m``: RandAugment's
    operations per image and level); ``policies.BatchPolicy`` is its batched twin."""
    if name == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    if name == "randaugment":
        return v2.RandAugment(num_ops=n, magnitude=m)
    return v2.TrivialAugmentWide()


def _per_channel(values: Channels, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)  # (C, 1, 1)


def normalize(images: torch.Tensor, mean: Channels, std: Channels, inplace: bool = False) -> torch.Tensor:
    """Float images in [0, 1], (..., C, H, W), to ``(x - mean) / std`` per channel."""
    mean, std = _per_channel(mean, images), _per_channel(std, images)
    return images.sub_(mean).div_(std) if inplace else (images - mean) / std


def denormalize(images: torch.Tensor, mean: Channels, std: Channels) -> torch.Tensor:
    """The inverse of ``normalize``: back to [0, 1] (clamped), for display."""
    return (images * _per_channel(std, images) + _per_channel(mean, images)).clamp(0, 1)


def to_input(
    images: torch.Tensor, mean: Channels, std: Channels, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """uint8 images (..., C, H, W) to the normalised float32 input of a network, contiguous in
    ``memory_format`` (``torch.channels_last`` for batches (B, C, H, W) of a channels-last network)."""
    # One copy, of the uint8 batch; the float ops after it keep its layout.
    return normalize(images.contiguous(memory_format=memory_format).float().mul_(1.0 / 255), mean, std, inplace=True)


class ToInput:
    """``to_input`` as a transform of one uint8 image (C, H, W), for the DataLoader's workers."""

    def __init__(self, mean: Channels, std: Channels) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return to_input(image.as_subclass(torch.Tensor), self.mean, self.std)


class Cutout:
    """``cutout_`` of one normalised image (C, H, W), for the DataLoader's workers: the tensor
    loader's operation on a batch of one."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return cutout_(image[None], self.size)[0]


def build_transform(
    augment: AugmentPreset,
    mean: Channels,
    std: Channels,
    cutout: int = 0,
    random_erasing: float = 0.0,
    randaugment_n: int = 2,
    randaugment_m: int = 9,
    size: int = IMAGE_SIZE,
    rotate: float = 0.0,
) -> Callable:
    """torchvision transform from a uint8 HWC array (size x size) to a normalised float (3, size, size) tensor.

    ``standard`` is the usual CIFAR augmentation: a random 32x32 crop of the image zero-padded by
    4 pixels on each side, then a horizontal flip with probability 0.5. ``translate`` crops from a
    2-pixel reflect padding instead, ``flip`` only flips (see ``AUGMENT_PRESETS``).
    ``autoaugment``, ``randaugment`` (``randaugment_n`` operations at level ``randaugment_m``) and
    ``trivialaugment`` run torchvision's policy on the image, then the standard crop and flip.
    ``rotate`` then turns each image by up to that many degrees either way (black corners, before
    the normalisation, as torchvision's ``RandomRotation`` on the image). After the
    normalisation, ``cutout`` zeroes a square of that side (``Cutout``), and ``random_erasing``
    is the probability of torchvision's ``RandomErasing`` with zeros (the mean colour), as the
    tensor loader does them per batch (``cutout_``, ``random_erasing_``).
    """
    if augment not in AUGMENT_PRESETS:
        raise UserError(f"unknown augmentation preset {augment!r}. Valid presets: {', '.join(AUGMENT_PRESETS)}")
    pad, pad_mode, flip = AUGMENT_PRESETS[augment]
    ops: list = [v2.ToImage()]
    if augment in POLICIES:
        ops.append(policy_transform(augment, randaugment_n, randaugment_m))
    if pad:
        ops.append(v2.RandomCrop(size, padding=pad, padding_mode=pad_mode))
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    if rotate:
        ops.append(v2.RandomRotation(rotate))  # nearest pixel, black corners: the tensor loader's
    ops.append(ToInput(mean, std))
    if cutout:
        ops.append(Cutout(cutout))
    if random_erasing:
        ops.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(ops)


def on_device(drawn: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Random numbers drawn on the CPU, moved to ``device``: the draws (a few per image) are the
    same whatever the device, so a GPU batch is augmented as the CPU batch of the same seed."""
    if device.type == "cpu":
        return drawn
    return drawn.pin_memory().to(device, non_blocking=True)  # no wait on the GPU's queue


def random_crop_flip(
    images: torch.Tensor,
    pad: int,
    pad_mode: str = "constant",
    flip: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random same-size crops of the padded images, then flips, for a whole batch at once.

    Args:
        images: (B, C, H, W), any dtype and memory layout (uint8 is cheapest).
        pad: pixels of padding on every side; the crop offset is uniform in [0, 2 * pad] per axis.
        pad_mode: ``constant`` (zeros) or ``reflect``, as in ``torch.nn.functional.pad``.
        flip: (B,) bool, which images to mirror left-right; None mirrors none.
        generator: random source of the crop offsets, a CPU generator (see ``on_device``).

    Returns:
        (B, C, H, W), a new tensor.
    """
    b, c, h, w = images.shape
    out = images
    if pad > 0:
        padded = F.pad(images, (pad,) * 4, mode=pad_mode)  # (B, C, H + 2p, W + 2p)
        n = 2 * pad + 1
        sb, sc, sh, sw = padded.stride()
        # crops[i, dy, dx] is the (C, H, W) window of image i at offset (dy, dx): a view of all
        # n * n windows of every image, from which one advanced-indexing gather picks one each.
        crops = padded.as_strided((b, n, n, c, h, w), (sb, sh, sw, sc, sh, sw))
        dy, dx = on_device(torch.randint(0, n, (2, b), generator=generator), images.device)
        out = crops[torch.arange(b, device=images.device), dy, dx]
    if flip is not None:
        out = torch.where(flip.view(b, 1, 1, 1), out.flip(-1), out)
    return out


def cutout_(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square at a random centre of each image, in place; return it.

    After normalisation zero is the mean colour. The square may extend past the border, as in
    DeVries & Taylor 2017 (arXiv:1708.04552). ``images``: (B, C, H, W) float. ``generator``: a
    CPU generator (see ``on_device``).
    """
    b, _, h, w = images.shape
    device = images.device
    cy = on_device(torch.randint(0, h, (b, 1), generator=generator), device) - size // 2
    cx = on_device(torch.randint(0, w, (b, 1), generator=generator), device) - size // 2
    return _zero_boxes_(images, cy, cx, size, size)


def _zero_boxes_(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h, w) -> torch.Tensor:
    """Zero, in place, the box of each image from (``top``, ``left``), (B, 1) on its device,
    ``h`` x ``w`` (numbers or (B, 1)); the parts past the border are ignored."""
    rows = torch.arange(images.shape[-2], device=images.device)
    cols = torch.arange(images.shape[-1], device=images.device)
    in_rows = (rows >= top) & (rows < top + h)  # (B, H)
    in_cols = (cols >= left) & (cols < left + w)  # (B, W)
    return images.masked_fill_(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0.0)


def random_erasing_(
    images: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020, arXiv:1708.04896) of a whole batch, in place, drawn as
    torchvision's ``RandomErasing`` draws per image: with probability ``p``, a rectangle of area
    ``scale`` x the image and aspect ``ratio`` (log-uniform), the first of 10 tries that fits,
    at a uniform position, set to zero (the mean colour after normalisation); no rectangle when
    none of the tries fits. ``images``: (B, C, H, W) float; ``generator``: a CPU generator."""
    b, _, h, w = images.shape
    device = images.device
    tries = 10
    erase = torch.rand(b, generator=generator) < p
    area = h * w * (scale[0] + (scale[1] - scale[0]) * torch.rand(b, tries, generator=generator))
    log_lo, log_hi = torch.log(torch.tensor(ratio[0])), torch.log(torch.tensor(ratio[1]))
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(b, tries, generator=generator))
    eh, ew = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
    fits = (eh < h) & (ew < w)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    erase &= fits.any(dim=1)
    eh, ew = eh.gather(1, first).squeeze(1), ew.gather(1, first).squeeze(1)
    top = (torch.rand(b, generator=generator) * (h - eh + 1)).long()
    left = (torch.rand(b, generator=generator) * (w - ew + 1)).long()
    eh, ew = eh * erase, ew * erase  # nothing erased where the coin said no or nothing fitted
    top, left, eh, ew = (on_device(t[:, None], device) for t in (top, left, eh, ew))
    return _zero_boxes_(images, top, left, eh, ew)


def batch_mixing(mixup: float, cutmix: float, num_classes: int, mixup_prob: float = 0.5) -> Callable | None:
    """torchvision's MixUp (Zhang et al. 2018, arXiv:1710.09412) and CutMix (Yun et al. 2019,
    arXiv:1905.04899) of a training batch, or None when both are off.

    ``mixup`` and ``cutmix`` are the alphas of their Beta distributions (0: off). With both, each
    batch gets one of them, mixup with probability ``mixup_prob``. The result is ``(images, soft
    targets)``: each image mixed with its neighbour in the (shuffled) batch with one weight λ per
    batch, and the targets mixed with the same weight, as (B, num_classes) probabilities; for
    CutMix λ is the area left of the image after its box is clipped to the border.
    """
    for name, alpha in (("mixup", mixup), ("cutmix", cutmix)):
        if alpha < 0:
            raise UserError(f"{name} is the alpha of a Beta distribution: 0 (off) or positive, got {alpha}. Try 1.0.")
    if not 0.0 <= mixup_prob <= 1.0:
        raise UserError(f"mixup_prob is a probability, between 0 and 1, got {mixup_prob}.")
    mixes = [
        (v2.MixUp(alpha=mixup, num_classes=num_classes), mixup_prob) if mixup else None,
        (v2.CutMix(alpha=cutmix, num_classes=num_classes), 1.0 - mixup_prob) if cutmix else None,
    ]
    chosen = [m for m in mixes if m is not None]
    if not chosen:
        return None
    if len(chosen) == 1:
        return chosen[0][0]
    return v2.RandomChoice([m for m, _ in chosen], p=[p for _, p in chosen])
