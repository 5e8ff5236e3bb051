"""Augmentation policies: AutoAugment's CIFAR-10 policy, RandAugment and TrivialAugment, per image
(torchvision's transforms, ``transforms.policy_transform``, in the DataLoader's workers) and per
batch (``BatchPolicy``, in the tensor loader).

Both draw from the same distribution: the operations, their magnitudes and the policy tables are
torchvision's own (read from its transform classes, not copied), and ``BatchPolicy`` applies
each operation with torchvision's arithmetic to every image that drew it, with that image's own
magnitude, in one tensor operation per operation: no Python loop over images.

- AutoAugment (Cubuk et al. 2019, arXiv:1805.09501), CIFAR-10 policy: one of 25 sub-policies per
  image, each two operations applied with their own probability and magnitude.
- RandAugment (Cubuk et al. 2020, arXiv:1909.13719): ``n`` operations per image, uniformly, each
  at magnitude ``m`` of 31 levels.
- TrivialAugment (Müller & Hutter 2021, arXiv:2103.10158), wide: one operation per image at a
  uniform magnitude.

Every signed magnitude (shear, translation, rotation, enhancement) takes a random sign.
Geometric operations fill with black and use nearest pixels, torchvision's defaults.

The operations compute the CPU's pixels on any device: their arithmetic rounds the same
everywhere (blends rounded once, in float64, as torchvision's fused add rounds them on a CPU; the
sharpness blur an exact integer window sum; the sampling grid in separate elementwise operations),
with no convolution or matrix product, whose reduced-precision paths (TF32) differ by device.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import torch
from torchvision.transforms.v2 import functional as TF

from cifar_lightning.data.transforms import PolicyName, on_device, policy_transform

#: Magnitude bins of each policy, as torchvision sets them.
_BINS = {"autoaugment": 10, "randaugment": 31, "trivialaugment": 31}


def _space(name: PolicyName) -> dict[str, tuple[Callable, bool]]:
    return type(policy_transform(name))._AUGMENTATION_SPACE  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# The operations, on uint8 (B, 3, H, W) with one magnitude per image (B,)
# ---------------------------------------------------------------------------------------------


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """(B,) factors in float64, as torchvision computes them in Python, rounded once to float32."""
    return values.float().view(-1, 1, 1, 1)


def _factor(m: torch.Tensor) -> torch.Tensor:
    # torchvision's enhancement factor, 1 + magnitude, computed in double precision.
    return 1.0 + m.double()


def _fused(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    """``a + b * c`` of float32 values rounded once to float32, as a fused multiply-add rounds it
    (torchvision's ``a.add_(b, alpha=c)`` on a CPU's vector units, and on a GPU), the same on every
    device: in float64, where for pixel values the product and the sum are exact."""
    return (a.double() + b.double() * c).float()


#: torchvision's grey weights, as the float32 operations that apply them see them.
_GREY = tuple(torch.tensor(w, dtype=torch.float32).item() for w in (0.2989, 0.587, 0.114))


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    # torchvision's _blend, with one ratio per image.
    blended = _fused(images.float() * _per_image(ratio), other, _per_image(1.0 - ratio))
    return blended.clamp_(0, 255).to(torch.uint8)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    grey = _fused(_fused(r.float() * _GREY[0], g, _GREY[1]), b, _GREY[2])
    return grey.unsqueeze(1).floor_()


def _brightness(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (images.float() * _per_image(_factor(m))).clamp_(0, 255).to(torch.uint8)


def _color(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grayscale(images), _factor(m))


def _contrast(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grayscale(images).mean(dim=(1, 2, 3), keepdim=True), _factor(m))


def _sharpness(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # torchvision's: blend with a 3x3 blur (1s around a 5, over 13) inside a one-pixel border. The
    # blur is the integer sum of the window, exact in float32, over 13, rounded: torchvision's
    # rounded convolution on any device (a sum / 13 is never within 1/26 of a half, and no
    # convolution runs, so no TF32 or other reduced-precision path can move it).
    out = images.float()
    rows = out[..., :-2, :] + out[..., 1:-1, :] + out[..., 2:, :]
    inner = out[..., 1:-1, 1:-1]
    window = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    blurred = window.add_(inner, alpha=4).div_(13).round_()
    inner.copy_(_fused(inner, blurred.sub_(inner), _per_image(1.0 - _factor(m))))
    return out.clamp_(0, 255).to(torch.uint8)


def _autocontrast(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # torchvision's, with torch.where where it assigns through a boolean mask (an indexing that
    # may read the mask back from a GPU).
    x = images.float()
    low, high = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, high.sub_(low).mul_(1.0 / 255))
    return x.sub_(torch.where(flat, 0.0, low)).div_(scale).clamp_(0, 255).to(torch.uint8)


def _posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    bits = bits.long()
    mask = ((1 << bits) - 1) << (8 - bits)
    return images & _per_image(mask).to(torch.uint8)


def _solarize(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(images.float() >= _per_image(255.0 * m), 255 - images, images)


@functools.lru_cache(maxsize=None)
def _pixel_centres(device: torch.device, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y (1, H*W) of every output pixel in torchvision's frame (origin at the image centre,
    pixel centres at half-integers), float32: made on ``device`` once, with no copy from the host."""
    xs = torch.arange(w, dtype=torch.float32, device=device) - (w - 1) / 2
    ys = torch.arange(h, dtype=torch.float32, device=device) - (h - 1) / 2
    return xs.expand(h, w).reshape(1, h * w), ys[:, None].expand(h, w).reshape(1, h * w)


def _theta(inverse: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """torchvision's sampling matrices (B, 3, 2) from inverse affine matrices (B, 2, 3), on the CPU:
    the transposed matrix over half the image size, mapping pixel centres to normalised coordinates."""
    theta = inverse.transpose(1, 2).contiguous()
    theta[..., 0] /= 0.5 * w
    theta[..., 1] /= 0.5 * h
    return theta


def _affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample each image through its sampling matrix (B, 3, 2) (``_theta``, on the images' device),
    nearest pixel, black outside: torchvision's affine grid and grid_sample, the same pixels on any
    device."""
    b, _, h, w = images.shape
    px, py = _pixel_centres(images.device, h, w)
    t = theta.unsqueeze(-1)  # (B, 3, 2, 1)
    # [x, y, 1] @ theta, as torchvision's batched product computes it on a CPU (bit-identical there),
    # in separate elementwise operations that round once each on any device: a fused multiply-add or
    # another summation order would move the pixels whose source lies on a rounding boundary.
    gx = px * t[:, 0, 0] + py * t[:, 1, 0] + t[:, 2, 0]  # (B, H*W): normalised source coordinates
    gy = px * t[:, 0, 1] + py * t[:, 1, 1] + t[:, 2, 1]
    # grid_sample's nearest pixel, as its CPU kernel computes it ((g + 1) * size/2 - 0.5, rounded
    # half to even), gathered directly: a copy of whole pixels needs no interpolation.
    x = ((gx + 1) * (w / 2) - 0.5).round_()
    y = ((gy + 1) * (h / 2) - 0.5).round_()
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    index = (y.clamp_(0, h - 1) * w + x.clamp_(0, w - 1)).long()
    flat = images.reshape(b, images.shape[1], h * w)
    out = flat.gather(2, index[:, None, :].expand(-1, images.shape[1], -1)) * inside[:, None, :]
    return out.view(b, -1, h, w).to(torch.uint8)


def _inverse_matrix(
    angle: torch.Tensor,
    tx: torch.Tensor,
    ty: torch.Tensor,
    shear_x: torch.Tensor,
    shear_y: torch.Tensor,
    cx: float,
    cy: float,
) -> torch.Tensor:
    """torchvision's inverse affine matrix (``_get_inverse_affine_matrix``, scale 1), per image:
    angles in degrees, centre ``(cx, cy)`` relative to the image centre. In double precision, as
    torchvision computes it in Python, then float32, as it hands it to the sampling grid."""
    angle, tx, ty, shear_x, shear_y = (t.double() for t in (angle, tx, ty, shear_x, shear_y))
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return torch.stack([torch.stack([m0, m1, m2], -1), torch.stack([m3, m4, m5], -1)], -2).float()


#: The operations that move pixels: one sampling grid serves them all.
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def _inverse_for(kind: str, m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse matrices (B, 2, 3) of geometric operation ``kind`` at magnitudes ``m``."""
    zero = torch.zeros_like(m)
    if kind == "ShearX":  # about the top-left corner, as torchvision's policies shear
        return _inverse_matrix(zero, zero, zero, torch.rad2deg(torch.atan(m.double())), zero, -w * 0.5, -h * 0.5)
    if kind == "ShearY":
        return _inverse_matrix(zero, zero, zero, zero, torch.rad2deg(torch.atan(m.double())), -w * 0.5, -h * 0.5)
    if kind == "TranslateX":  # whole pixels, as torchvision's int(magnitude)
        return _inverse_matrix(zero, m.trunc(), zero, zero, zero, 0.0, 0.0)
    if kind == "TranslateY":
        return _inverse_matrix(zero, zero, m.trunc(), zero, zero, 0.0, 0.0)
    return _inverse_matrix(-m, zero, zero, zero, zero, 0.0, 0.0)  # Rotate: torchvision's is of -angle


def _geometric(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def apply(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # The matrices are made on the CPU, where the magnitudes are drawn (magnitudes on a device
        # would be read back), in the same arithmetic whatever the images' device.
        h, w = images.shape[-2:]
        return _affine(images, on_device(_theta(_inverse_for(kind, m.cpu(), h, w), h, w), images.device))

    return apply


#: Each operation: uint8 (B, 3, H, W) and magnitudes (B,) -> uint8 (B, 3, H, W). The magnitudes are
#: on the images' device, but for the geometric operations, which take them on the CPU.
OPERATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Identity": lambda x, m: x,
    "ShearX": _geometric("ShearX"),
    "ShearY": _geometric("ShearY"),
    "TranslateX": _geometric("TranslateX"),
    "TranslateY": _geometric("TranslateY"),
    "Rotate": _geometric("Rotate"),
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _autocontrast,
    "Equalize": lambda x, m: TF.equalize(x),
    "Invert": lambda x, m: TF.invert(x),
}


# ---------------------------------------------------------------------------------------------
# A policy over a batch
# ---------------------------------------------------------------------------------------------


class BatchPolicy:
    """Policy ``name`` applied to each image of a uint8 batch (B, 3, H, W) on any device: every
    image draws its own operations and magnitudes (on the CPU generator it is given, as the
    crops do), and each operation then runs once on the images that drew it.

    Args:
        name: ``autoaugment``, ``randaugment`` or ``trivialaugment``.
        n, m: RandAugment's operations per image and magnitude level (0-30).
        height, width: the images' size (translations scale with it).
    """

    def __init__(self, name: PolicyName, n: int = 2, m: int = 9, height: int = 32, width: int = 32) -> None:
        self.name, self.n, self.m = name, n, m
        space = _space(name)
        self.ops = list(space)
        bins = _BINS[name]
        # (op index) -> magnitudes per bin (None: no magnitude), signed
        magnitudes = [space[op][0](bins, height, width) for op in self.ops]
        self.table = torch.zeros(len(self.ops), bins)  # (op, bin) -> magnitude; 0 for none
        for i, mags in enumerate(magnitudes):
            if mags is not None:
                self.table[i] = mags.float()
        self.signed = torch.tensor([space[op][1] for op in self.ops])
        # The order in which a step sorts its images: the geometric operations (resampled together),
        # then the others; Identity and the steps not applied go last, as group len(sequence).
        geometric = [i for i, op in enumerate(self.ops) if op in GEOMETRIC]
        self.sequence = geometric + [i for i, op in enumerate(self.ops) if op not in GEOMETRIC and op != "Identity"]
        self.group = torch.full((len(self.ops),), len(self.sequence))
        self.group[self.sequence] = torch.arange(len(self.sequence))
        if name == "autoaugment":
            policies = policy_transform(name)._policies  # type: ignore[attr-defined]
            # (sub-policy, step) -> op index, probability, magnitude bin
            self.sub_ops = torch.tensor([[self.ops.index(op) for op, _, _ in p] for p in policies])
            self.sub_probs = torch.tensor([[prob for _, prob, _ in p] for p in policies])
            self.sub_bins = torch.tensor([[b if b is not None else 0 for _, _, b in p] for p in policies])

    def draw(
        self, b: int, generator: torch.Generator | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The steps of a batch of ``b`` images: per step, (op index, magnitude, applied) per image."""
        steps = []
        if self.name == "autoaugment":
            chosen = torch.randint(0, len(self.sub_ops), (b,), generator=generator)
            for step in range(2):
                ops = self.sub_ops[chosen, step]
                applied = torch.rand(b, generator=generator) <= self.sub_probs[chosen, step]
                steps.append((ops, self._magnitude(ops, self.sub_bins[chosen, step], generator), applied))
            return steps
        for _ in range(self.n if self.name == "randaugment" else 1):
            ops = torch.randint(0, len(self.ops), (b,), generator=generator)
            if self.name == "randaugment":
                bins = torch.full((b,), self.m)
            else:
                bins = torch.randint(0, _BINS[self.name], (b,), generator=generator)
            steps.append((ops, self._magnitude(ops, bins, generator), torch.ones(b, dtype=torch.bool)))
        return steps

    def _magnitude(self, ops: torch.Tensor, bins: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        magnitude = self.table[ops, bins]
        flip = torch.rand(len(ops), generator=generator) <= 0.5
        return torch.where(self.signed[ops] & flip, -magnitude, magnitude)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        out = images
        for ops, magnitude, applied in self.draw(len(images), generator):
            out = self._step(out, ops, magnitude, applied)
        return out

    def _step(
        self, images: torch.Tensor, ops: torch.Tensor, magnitude: torch.Tensor, applied: torch.Tensor
    ) -> torch.Tensor:
        """One step of the policy. The images are sorted by operation on the CPU, where the draws are
        (geometric operations first, then the others, then those left as they are), so that each
        operation runs on a contiguous slice: the device gets one copy a step (the order, the
        magnitudes and the sampling matrices), and is never asked which operations occur."""
        b, (h, w) = len(images), images.shape[-2:]
        group = torch.where(applied, self.group[ops], len(self.sequence))
        counts = torch.bincount(group, minlength=len(self.sequence) + 1).tolist()
        if counts[-1] == b:
            return images
        order = torch.argsort(group, stable=True)
        magnitude = magnitude[order]
        ends = list(itertools.accumulate(counts))
        geometric = [
            _inverse_for(self.ops[op], magnitude[end - n : end], h, w)
            for op, n, end in zip(self.sequence, counts, ends)
            if n and self.ops[op] in GEOMETRIC
        ]
        theta = _theta(torch.cat(geometric), h, w) if geometric else magnitude.new_zeros(0, 3, 2)
        inverse = torch.argsort(order)
        packed = on_device(torch.cat([t.double() for t in (order, inverse, magnitude, theta.flatten())]), images.device)
        order_d, inverse_d = packed[:b].long(), packed[b : 2 * b].long()
        magnitude_d, theta_d = packed[2 * b : 3 * b].to(magnitude.dtype), packed[3 * b :].view(-1, 3, 2).float()
        ranked = images.index_select(0, order_d)
        n_moved = len(theta)
        pieces = [_affine(ranked[:n_moved], theta_d)] if n_moved else []
        for op, n, end in zip(self.sequence, counts, ends):
            if n and self.ops[op] not in GEOMETRIC:
                pieces.append(OPERATIONS[self.ops[op]](ranked[end - n : end], magnitude_d[end - n : end]))
        pieces.append(ranked[b - counts[-1] :])
        return torch.cat(pieces).index_select(0, inverse_d)
