"""Augmentation policies (AutoAugment, RandAugment, TrivialAugment): each batched operation is
torchvision's, at every magnitude, and both loaders draw from the same distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_augment import _ks_statistic, labelled_arrays, make_dm
from torchvision.transforms import v2

from cifar_lightning.data import CIFAR10_MEAN, CIFAR10_STD, build_transform, policies
from cifar_lightning.data.policies import OPERATIONS, BatchPolicy
from cifar_lightning.data.transforms import POLICIES, policy_transform
from cifar_lightning.errors import UserError


def torchvisions(op: str, image: torch.Tensor, magnitude: float) -> torch.Tensor:
    """torchvision's own definition of ``op`` at ``magnitude`` (the method its policies call)."""
    return v2.TrivialAugmentWide()._apply_image_or_video_transform(
        image, op, magnitude, interpolation=v2.InterpolationMode.NEAREST, fill={torch.Tensor: None}
    )


def magnitudes(policy: str) -> list[tuple[str, float]]:
    """Every (operation, signed magnitude) a policy can draw."""
    out = []
    batch = BatchPolicy(policy)
    for i, op in enumerate(batch.ops):
        values = sorted({float(v) for v in batch.table[i]})
        out += [(op, v) for v in values] + ([(op, -v) for v in values if v] if bool(batch.signed[i]) else [])
    return out


@pytest.mark.parametrize("policy", ["trivialaugment", "autoaugment", "randaugment"])
def test_every_batched_operation_is_torchvisions_at_every_magnitude(policy):
    images = labelled_arrays(6)[0].permute(0, 3, 1, 2).contiguous()  # uint8 (6, 3, 32, 32)
    cases = magnitudes(policy)
    assert {op for op, _ in cases} == set(BatchPolicy(policy).ops)
    for op, magnitude in cases:
        ours = OPERATIONS[op](images, torch.full((len(images),), magnitude))
        theirs = torch.stack([torchvisions(op, image, magnitude) for image in images])
        assert torch.equal(ours, theirs), (op, magnitude)


def test_blends_round_once_as_torchvisions_do():
    # torchvision blends with add(alpha=), one rounding (a fused multiply-add) on a CPU's vector
    # units; ours is computed so that it rounds once on every device. Noise images meet the
    # rounding boundaries that two roundings would cross.
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for op in ("Color", "Contrast", "Sharpness", "Brightness"):
        for magnitude in (-0.9, -0.5, -0.13, 0.07, 0.3, 0.77):
            ours = OPERATIONS[op](images, torch.full((len(images),), magnitude))
            assert torch.equal(ours, torch.stack([torchvisions(op, image, magnitude) for image in images])), (
                op,
                magnitude,
            )


def test_rotation_at_any_angle_is_torchvisions():
    # --rotate draws any angle: the sampling grid's arithmetic is torchvision's at every one of them.
    images = labelled_arrays(4)[0].permute(0, 3, 1, 2).contiguous()
    angles = torch.empty(40, dtype=torch.float64).uniform_(-30, 30, generator=torch.Generator().manual_seed(0))
    for angle in angles.tolist():
        ours = OPERATIONS["Rotate"](images, torch.full((len(images),), angle, dtype=torch.float64))
        assert torch.equal(ours, torch.stack([torchvisions("Rotate", image, angle) for image in images])), angle


def test_operations_do_what_their_names_say():
    image = torch.arange(32 * 32 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, 3, 32, 32)
    shifted = OPERATIONS["TranslateX"](image, torch.tensor([5.0]))
    assert torch.equal(shifted[..., 5:], image[..., :-5]) and not shifted[..., :5].any()  # right, black in
    assert torch.equal(OPERATIONS["Posterize"](image, torch.tensor([4.0])), image & 0xF0)  # 4 bits kept
    solar = OPERATIONS["Solarize"](image, torch.tensor([0.5]))  # threshold 127.5
    assert torch.equal(solar, torch.where(image >= 128, 255 - image, image))
    assert torch.equal(OPERATIONS["Rotate"](image, torch.tensor([90.0])), image.rot90(1, dims=(2, 3)))
    assert torch.equal(OPERATIONS["Invert"](image, torch.tensor([0.0])), 255 - image)
    bright = OPERATIONS["Brightness"](image, torch.tensor([0.5]))
    assert torch.equal(bright, (image.float() * 1.5).clamp(0, 255).to(torch.uint8))
    flat = torch.cat([torch.full_like(image[:, :1], 7), image[:, 1:]], dim=1)  # one channel of one value
    assert torch.equal(
        OPERATIONS["AutoContrast"](flat, torch.tensor([0.0])), torchvisions("AutoContrast", flat[0], 0)[None]
    )


@pytest.mark.parametrize("policy", POLICIES)
def test_a_batch_is_each_images_own_draws_applied_to_it(policy):
    # The batch sorts its images by operation and puts them back: each image must come out as its
    # own operations, at its own magnitudes, make it one image at a time.
    images = labelled_arrays(48)[0].permute(0, 3, 1, 2).contiguous()
    batch = BatchPolicy(policy)
    steps = batch.draw(len(images), torch.Generator().manual_seed(3))
    expected = images.clone()
    for ops, magnitude, applied in steps:
        for i in range(len(images)):
            if applied[i]:
                expected[i : i + 1] = OPERATIONS[batch.ops[ops[i]]](expected[i : i + 1], magnitude[i : i + 1])
    assert torch.equal(batch(images, torch.Generator().manual_seed(3)), expected)


def test_a_policy_step_copies_once_and_makes_no_constant(monkeypatch):
    # On a GPU, a tensor made from Python data in a step, or each operation's own copy of its
    # images' indices, waits for the device or costs a transfer: a step sends one packed copy (the
    # order, magnitudes and sampling matrices), and the constants are made once per device.
    images = labelled_arrays(64)[0].permute(0, 3, 1, 2).contiguous()
    built = {name: BatchPolicy(name) for name in POLICIES}
    for batch in built.values():
        batch(images, torch.Generator().manual_seed(0))  # the constants, once
    made = policies._pixel_centres.cache_info().currsize
    copies = []
    monkeypatch.setattr(policies, "on_device", lambda t, device: copies.append(t) or t)

    def refuse(*args, **kwargs):
        raise AssertionError(f"a tensor made from data in a policy step: {args} {kwargs}")

    for factory in ("tensor", "as_tensor", "linspace"):
        monkeypatch.setattr(torch, factory, refuse)
    for name, steps in (("autoaugment", 2), ("randaugment", 2), ("trivialaugment", 1)):
        copies.clear()
        for seed in range(4):
            built[name](images, torch.Generator().manual_seed(seed))
        assert len(copies) == 4 * steps, (name, len(copies))  # one a step, whatever operations were drawn
    assert policies._pixel_centres.cache_info().currsize == made


def _per_image_statistics(images: torch.Tensor, original: torch.Tensor) -> np.ndarray:
    """(mean brightness, mean absolute change) of each image: what a policy's draws move."""
    changed = (images.float() - original.float()).abs().mean(dim=(1, 2, 3))
    return np.stack([images.float().mean(dim=(1, 2, 3)).numpy(), changed.numpy()], 1)


def _both_ways(policy: str, n: int, m: int, batch_m: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    image = labelled_arrays(1)[0].permute(0, 3, 1, 2)[0].contiguous()
    torch.manual_seed(0)
    per_image = policy_transform(policy, n, m)
    one_by_one = torch.stack([per_image(image) for _ in range(3000)])
    batch = BatchPolicy(policy, n, m if batch_m is None else batch_m)(
        image.expand(3000, -1, -1, -1).contiguous(), torch.Generator().manual_seed(1)
    )
    return _per_image_statistics(one_by_one, image[None]), _per_image_statistics(batch, image[None])


@pytest.mark.parametrize("policy", POLICIES)
def test_both_loaders_draw_from_the_same_policy_distribution(policy):
    a, b = _both_ways(policy, 2, 9)
    critical = 1.95 * math.sqrt(2 / 3000)  # two-sample KS at the 0.1% level
    for column in range(a.shape[1]):
        assert _ks_statistic(a[:, column], b[:, column]) < critical, (policy, column)


def test_the_policy_distribution_test_sees_another_magnitude():
    a, b = _both_ways("randaugment", 2, 9, batch_m=20)
    assert max(_ks_statistic(a[:, c], b[:, c]) for c in range(2)) > 1.95 * math.sqrt(2 / 3000)


@pytest.mark.parametrize("loader", ["tensor", "torchvision"])
def test_policies_on_both_loaders_and_their_errors(tiny_folder, loader):
    for augment in POLICIES:
        dm = make_dm(tiny_folder, loader=loader, augment=augment, randaugment_n=1, randaugment_m=30)
        dm.setup("fit")
        x, _ = next(iter(dm.train_dataloader()))
        assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    transform = build_transform("randaugment", CIFAR10_MEAN, CIFAR10_STD, randaugment_n=3, randaugment_m=4)
    policy = next(t for t in transform.transforms if isinstance(t, v2.RandAugment))
    assert (policy.num_ops, policy.magnitude) == (3, 4)
    with pytest.raises(UserError, match="a level from 0 to 30, got n=2, m=31"):
        make_dm(tiny_folder, loader=loader, augment="randaugment", randaugment_m=31)
