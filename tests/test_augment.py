"""The tensor data path: batched augmentation, DDP sharding, agreement with the PIL path, a fit,
and the recipe pieces it feeds (TTA, training tricks)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import labelled_image
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DistributedSampler

from cifar_lightning import ClassifierModule
from cifar_lightning.callbacks import FreezeAfter, Lookahead, ScaleGradients
from cifar_lightning.data import (
    AUGMENT_PRESETS,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10DataModule,
    EpochShards,
    TensorLoader,
    build_transform,
    cutout_,
    random_crop_flip,
)
from cifar_lightning.data.transforms import random_erasing_
from cifar_lightning.errors import UserError
from cifar_lightning.fit import fit_main

MEAN = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)


def labelled_arrays(n: int, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 32, 32, 3) images whose brightest channel is their label, and the labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = np.stack([labelled_image(int(lab), rng) for lab in labels])
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def windows(image: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
    """Every crop (and its mirror) of one padded (C, H, W) image: (2 * (2p+1)^2, C, H, W)."""
    padded = torch.nn.functional.pad(image[None].float(), (pad,) * 4, mode=mode)[0]
    h, w = image.shape[-2:]
    crops = [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    return torch.stack(crops + [c.flip(-1) for c in crops])


def make_loader(n=64, train=True, **kw) -> TensorLoader:
    images, labels = labelled_arrays(n)
    kw.setdefault("batch_size", 16)
    return TensorLoader(images, labels, torch.arange(n), train=train, **kw)


# ---------------------------------------------------------------------------------------------
# Batched augmentation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["standard", "translate"])
def test_crops_stay_within_the_padded_image(preset):
    pad, mode, _ = AUGMENT_PRESETS[preset]
    images, _ = labelled_arrays(24)
    x = images.permute(0, 3, 1, 2)  # (B, 3, 32, 32) uint8, channels-last strides
    flips = torch.rand(len(x), generator=torch.Generator().manual_seed(0)) < 0.5
    out = random_crop_flip(x, pad, mode, flips, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(len(x)):
        candidates = windows(x[i], pad, mode)
        matches = (candidates == out[i].float()).flatten(1).all(1).nonzero().flatten().tolist()
        assert matches, f"image {i} is not a crop of its padded self"
        mirrored = [m >= len(candidates) // 2 for m in matches]
        assert bool(flips[i]) in mirrored  # flipped exactly when asked (some crops are symmetric)


def test_crop_offsets_cover_the_whole_range():
    x = torch.arange(32, dtype=torch.uint8).repeat(400, 3, 32, 1)  # column index as the value
    out = random_crop_flip(x, 4, "constant", None, torch.Generator().manual_seed(0))
    # column 10 of the output is column 10 + dx - 4 of the image: dx in [0, 8], uniform.
    shifts = out[:, 0, 16, 10].long() - 10 + 4  # row 16: inside the image for every dy
    assert shifts.min() == 0 and shifts.max() == 8
    counts = torch.bincount(shifts, minlength=9).float()
    assert counts.min() > 400 / 9 * 0.5


def test_flip_rate_and_labels_stay_aligned():
    loader = make_loader(n=2000, batch_size=500, augment="flip", seed=3)
    batches = _batches_of_epoch(loader, 0)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    img = x * STD + MEAN  # back to [0, 1]
    # the label is the brightest channel: every image travelled with its own label
    assert torch.equal(img.mean((2, 3)).argmax(1), y)
    raw, labels = labelled_arrays(2000)
    order = loader.indices[loader.sampler.positions(0)]
    assert torch.equal(labels[order], y)
    original = raw[order].permute(0, 3, 1, 2).float() / 255
    same = (img - original).abs().flatten(1).amax(1) < 1e-5
    mirror = (img - original.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert bool((same ^ mirror).all())  # each image is itself or its mirror
    assert 0.45 < mirror.float().mean() < 0.55


def _batches_of_epoch(loader: TensorLoader, epoch: int):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    loader = make_loader(n=256, batch_size=256, augment="flip", flip_mode="alternating", seed=5)
    raw, _ = labelled_arrays(256)
    states = []
    for epoch in range(3):
        ((x, _),) = _batches_of_epoch(loader, epoch)
        order = loader.indices[loader.sampler.positions(epoch)]
        original = (raw[order].permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
        mirrored = ~torch.isclose(x, original, atol=1e-5).flatten(1).all(1)
        states.append(torch.empty(256, dtype=torch.bool).index_put_((order,), mirrored))
    assert 0.4 < states[0].float().mean() < 0.6
    assert torch.equal(states[1], ~states[0]) and torch.equal(states[2], states[0])


def test_cutout_zeroes_one_square_per_image():
    x = torch.ones(200, 3, 32, 32)
    cutout_(x, 8, torch.Generator().manual_seed(0))
    zeroed = (x[:, 0] == 0).flatten(1).sum(1)
    assert zeroed.max() == 64 and zeroed.min() >= 16  # 8x8 inside, a corner at worst
    assert torch.equal(x[:, 0] == 0, x[:, 2] == 0)  # every channel


@pytest.mark.parametrize("augment", ["standard", "trivialaugment", "autoaugment"])
def test_same_seed_same_batches_new_epoch_new_batches(augment):
    a, b = make_loader(augment=augment, seed=7), make_loader(augment=augment, seed=7)
    first = [x for x, _ in a]
    assert all(torch.equal(p, q) for p, q in zip(first, (x for x, _ in b)))
    second = [x for x, _ in a]  # iterating again without set_epoch moves to the next epoch
    assert not torch.equal(first[0], second[0])
    again = [x for x, _ in _batches_of_epoch(a, 0)]  # set_epoch(0) repeats the first epoch
    assert all(torch.equal(p, q) for p, q in zip(first, again))


def test_channels_last_batches_reach_the_network_without_a_copy(tiny_folder, tmp_path):
    plain, last = make_loader(augment="standard", seed=3), make_loader(augment="standard", seed=3, channels_last=True)
    for (x, _), (z, _) in zip(plain, last):
        assert x.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, z)  # the same values, in another layout
    # Through a Trainer: the data module makes the batches in the layout the module runs in, and
    # the module hands the network that very tensor.
    seen = []
    model = ClassifierModule(arch="simple_cnn", num_classes=3, channels_last=True)

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(("batch", batch[0].data_ptr(), batch[0].is_contiguous(memory_format=torch.channels_last)))

    model.model.register_forward_pre_hook(lambda m, args: seen.append(("network", args[0].data_ptr(), None)))
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[Watch()],
    )
    trainer.fit(model, datamodule=make_dm(tiny_folder, loader="tensor", batch_size=8))
    batches = [s for s in seen if s[0] == "batch"]
    assert batches and all(s[2] for s in batches)
    networks = [s for s in seen if s[0] == "network"]
    assert [b[1] for b in batches] == [n[1] for n in networks]


# ---------------------------------------------------------------------------------------------
# Sharding under DDP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [40, 41])
@pytest.mark.parametrize("epoch", [0, 3])
def test_train_shards_match_distributed_sampler(n, epoch):
    shards = []
    for rank in range(2):
        ours = EpochShards(n, num_replicas=2, rank=rank, shuffle=True, pad=True, seed=11)
        ours.set_epoch(epoch)
        reference = DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=11)
        reference.set_epoch(epoch)
        assert ours.positions().tolist() == list(reference)
        assert len(ours) == math.ceil(n / 2)
        shards.append(set(ours.positions().tolist()))
    assert shards[0] | shards[1] == set(range(n))  # together they cover the training set
    assert len(shards[0] & shards[1]) == (n % 2)  # disjoint but for the padding repeat


def test_eval_shards_do_not_repeat():
    n = 41
    shards = [EpochShards(n, 2, rank, shuffle=False, pad=False).positions().tolist() for rank in range(2)]
    for rank, shard in enumerate(shards):
        assert shard == list(UnrepeatedDistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=False))
    assert sorted(shards[0] + shards[1]) == list(range(n))


def test_two_ranks_get_disjoint_batches_and_different_augmentation():
    # identical images: whatever differs between the ranks' batches comes from augmentation
    images = torch.from_numpy(labelled_image(1, np.random.default_rng(0))).repeat(64, 1, 1, 1)
    labels = torch.arange(64)
    ranks = [
        TensorLoader(
            images, labels, torch.arange(64), 32, train=True, augment="standard", num_replicas=2, rank=r, seed=4
        )
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 1
    (x0, y0), (x1, y1) = next(iter(ranks[0])), next(iter(ranks[1]))
    assert set(y0.tolist()).isdisjoint(y1.tolist()) and len(set(y0.tolist()) | set(y1.tolist())) == 64
    assert not torch.equal(x0, x1)


def test_loader_length_under_ddp():
    loader = make_loader(n=45, batch_size=8, num_replicas=4, rank=3)
    assert len(loader.sampler) == 12 and len(loader) == 2
    assert sum(len(y) for _, y in loader) == 12


# ---------------------------------------------------------------------------------------------
# The data module: both loaders agree; the tensor path trains
# ---------------------------------------------------------------------------------------------


def make_dm(data_dir, **kw) -> CIFAR10DataModule:
    kw.setdefault("val_size", 6)
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 5)
    return CIFAR10DataModule(data_dir=str(data_dir), download=False, **kw)


@pytest.mark.parametrize("normalize", [True, False])
def test_tensor_and_pil_paths_give_the_same_images(tiny_folder, normalize):
    pil = make_dm(tiny_folder, augment="none", normalize=normalize)
    tensor = make_dm(tiny_folder, augment="none", normalize=normalize, loader="tensor")
    for dm in (pil, tensor):
        dm.setup("fit")
        dm.setup("test")
    for name in ("val_dataloader", "test_dataloader"):
        a, b = list(getattr(pil, name)()), list(getattr(tensor, name)())
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b):
            torch.testing.assert_close(xb, xa, rtol=0, atol=0)  # the same operations, bit for bit
            assert torch.equal(ya, yb)
    # training batches, with augmentation off, hold the same images (in another order)
    xa = torch.cat([x for x, _ in pil.train_dataloader()])
    xb = torch.cat([x for x, _ in tensor.train_dataloader()])
    assert torch.equal(xa.flatten(1).sort(0).values, xb.flatten(1).sort(0).values)


def test_tensor_only_options_are_user_errors(tiny_folder):
    with pytest.raises(UserError, match="--data.loader tensor"):
        make_dm(tiny_folder, flip_mode="alternating", loader="torchvision")
    with pytest.raises(UserError, match="unknown loader"):
        make_dm(tiny_folder, loader="dali")


QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_tensor_path_fit(tiny_folder, tmp_path):
    report = fit_main(
        [
            "--data-dir",
            str(tiny_folder),
            "--output-dir",
            str(tmp_path),
            "--arch",
            "simple_cnn",
            "--batch-size",
            "8",
            "--val-size",
            "6",
            "--epochs",
            "2",
            "--data.loader=tensor",
            "--augment",
            "translate",
            "--data.flip_mode=alternating",
            "--data.cutout=8",
            "--model.tta=flip",
            *QUIET,
        ]
    )
    # 30 training images in batches of 8: 4 steps an epoch, as len(loader) told the trainer
    assert report["global_step"] == 8 and report["epochs"] == 2
    assert 0.0 <= report["test_acc"] <= 1.0 and Path(report["checkpoint"]).is_file()


def test_tensor_path_resumes_from_a_checkpoint(tiny_folder, tmp_path):
    def fit(epochs, ckpt=None):
        dm = make_dm(tiny_folder, loader="tensor", batch_size=8)
        model = ClassifierModule(arch="simple_cnn", num_classes=3, lr=0.01, tta="flip_translate")
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
            callbacks=[Lookahead(every=2)],
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        return trainer

    first = fit(1)
    path = tmp_path / "one.ckpt"
    first.save_checkpoint(path)
    resumed = fit(2, ckpt=str(path))
    assert resumed.global_step == 8 and resumed.current_epoch == 2


# ---------------------------------------------------------------------------------------------
# Test-time augmentation and the training tricks of the fastnet recipe
# ---------------------------------------------------------------------------------------------


def test_tta_averages_the_views():
    torch.manual_seed(0)
    model = ClassifierModule(arch="simple_cnn", num_classes=3, tta="flip").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.tta_logits(x), 0.5 * (model(x) + model(x.flip(-1))))
        model.hparams.tta = "flip_translate"
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        views = [x, x.flip(-1)] + [v for s in (padded[..., :32, :32], padded[..., 2:, 2:]) for v in (s, s.flip(-1))]
        weights = [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
        expected = sum(w * model(v) for w, v in zip(weights, views))
        torch.testing.assert_close(model.tta_logits(x), expected)
    with pytest.raises(UserError, match="unknown tta"):
        ClassifierModule(arch="simple_cnn", tta="mirror")


def test_scale_gradients_and_freeze_after():
    model = ClassifierModule(arch="fastnet", num_classes=3)
    trainer = type("T", (), {"current_epoch": 0, "world_size": 2})()
    scale, freeze = ScaleGradients(r"\.bn\d\.bias$", 64.0), FreezeAfter(r"whiten\.bias$", epochs=3)
    scale.setup(trainer, model, "fit")
    freeze.setup(trainer, model, "fit")
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    scale.on_before_optimizer_step(trainer, model, None)
    freeze.on_before_optimizer_step(trainer, model, None)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert float(grads["model.groups.0.bn1.bias"][0]) == 64.0 and float(grads["model.head.weight"][0, 0]) == 1.0
    assert grads["model.whiten.bias"] is not None  # still trained in epoch 0
    trainer.current_epoch = 3
    freeze.on_before_optimizer_step(trainer, model, None)
    assert model.model.whiten.bias.grad is None
    assert model.model.whiten.bias.requires_grad  # under DDP every rank keeps the same backward
    with pytest.raises(UserError, match="no trainable parameter name matches"):
        ScaleGradients("nothing-like-this").setup(trainer, model, "fit")


def test_freeze_after_skips_the_backward_in_one_process():
    model = ClassifierModule(arch="fastnet", num_classes=3)
    bias, conv = model.model.whiten.bias, model.model.groups[0].conv1
    trainer = type("T", (), {"current_epoch": 2, "world_size": 1})()
    freeze = FreezeAfter(r"whiten\.bias$", epochs=3)
    freeze.setup(trainer, model, "fit")
    x = torch.randn(2, 3, 32, 32)
    seen = []
    conv.register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(grad_in[0] is not None))
    freeze.on_train_epoch_start(trainer, model)
    model(x).sum().backward()
    assert bias.grad is not None and seen == [True]  # epoch 2: the input gradient is needed
    trainer.current_epoch = 3
    freeze.on_train_epoch_start(trainer, model)
    model.zero_grad()
    model(x).sum().backward()
    assert not bias.requires_grad and bias.grad is None and seen == [True, False]
    freeze.on_fit_end(trainer, model)
    assert bias.requires_grad


def test_lookahead_pulls_towards_the_average_and_ends_on_it():
    module = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        module.weight.zero_()
    trainer = type("T", (), {"global_step": 0, "estimated_stepping_batches": 4})()
    la = Lookahead(every=2, decay=0.5, power=1.0)
    la.on_train_start(trainer, module)
    for step, value in zip((1, 2, 3, 4), (1.0, 2.0, 3.0, 4.0)):
        with torch.no_grad():
            module.weight.fill_(value)  # what the optimizer step produced
        trainer.global_step = step
        la.on_train_batch_end(trainer, module, None, None, step - 1)
    # step 2: decay 0.5 * 2/4 = 0.25 -> ema = 0.25 * 0 + 0.75 * 2 = 1.5, weights <- 1.5
    # step 4: decay 0.5 -> ema = 0.5 * 1.5 + 0.5 * 4 = 2.75, the last step keeps the average
    assert torch.allclose(module.weight, torch.full((1, 2), 2.75))


@pytest.mark.slow
def test_tensor_path_under_ddp_matches_one_process(tmp_path):
    # Two CPU processes (gloo): each rank trains on its own shard, and the unrepeated evaluation
    # shards give the same test metrics as a single process.
    import json
    import subprocess
    import sys

    from conftest import REPO, write_image_folder

    data = write_image_folder(tmp_path / "data", n_train=10, n_test=5)
    out = tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "fit.py"),
            "--data-dir",
            str(data),
            "--output-dir",
            str(out),
            "--arch",
            "simple_cnn",
            "--batch-size",
            "4",
            "--val-size",
            "6",
            "--epochs",
            "1",
            "--devices",
            "2",
            "--accelerator",
            "cpu",
            "--data.loader=tensor",
            *QUIET,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(out.rglob("test_report.json")).read_text())
    # 24 training images, 2 ranks x 12, batches of 4: 3 steps
    assert report["devices"] == 2 and report["global_step"] == 3 and report["test_images"] == 15
    dm = make_dm(data, loader="tensor", batch_size=4)
    model = ClassifierModule.load_from_checkpoint(report["checkpoint"], map_location="cpu")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    (single,) = trainer.test(model, datamodule=dm, verbose=False)
    assert single["test/acc"] == pytest.approx(report["test_acc"], abs=1e-6)
    assert single["test/loss"] == pytest.approx(report["test_loss"], rel=1e-5)


def test_tta_average_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = ClassifierModule(arch="simple_cnn", num_classes=3, tta="flip").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        views = model(x), model(x.flip(-1))
        assert views[0].dtype == torch.bfloat16
        averaged = model.tta_logits(x)
    assert averaged.dtype == torch.float32
    torch.testing.assert_close(averaged, 0.5 * (views[0].float() + views[1].float()))


# ---------------------------------------------------------------------------------------------
# Cutout and random erasing: the same distribution on both loaders
# ---------------------------------------------------------------------------------------------


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    grid = np.union1d(a, b)
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def _erased_shapes(batch: torch.Tensor) -> np.ndarray:
    """(rows, cols) of the zeroed pixels' bounding box in each image ((0, 0) when none), after
    checking that the zeroed pixels of an image are exactly that box."""
    zero = (batch == 0).all(dim=1)  # (B, H, W)
    shapes = []
    for z in zero:
        rows, cols = torch.nonzero(z, as_tuple=True)
        if len(rows) == 0:
            shapes.append((0, 0))
            continue
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h * w == len(rows)  # one rectangle
        shapes.append((h, w))
    return np.array(shapes)


def test_cutout_in_the_dataloaders_transform_zeroes_one_square_per_image():
    # The per-image transform runs the tensor loader's own cutout_ on a batch of one; what is
    # checked here is that it does so in the DataLoader's pipeline: every image, after the
    # normalisation, one box of side 8 clipped at the border (a centre inside: at least 4).
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    torch.manual_seed(0)
    transform = build_transform("standard", CIFAR10_MEAN, CIFAR10_STD, cutout=8)
    shapes = _erased_shapes(torch.stack([transform(image) for _ in range(500)]))
    assert shapes.min() >= 4 and shapes.max() == 8 and (shapes == 8).all(1).mean() > 0.5


@pytest.mark.parametrize("option", [{"random_erasing": 0.5}])
def test_both_loaders_erase_from_the_same_distribution(option):
    # A grey image, normalised: no pixel is exactly zero (the mean is not a whole 8-bit value)
    # until one is erased.
    n = 2000
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    torch.manual_seed(0)
    per_image = build_transform("none", CIFAR10_MEAN, CIFAR10_STD, **option)
    one_by_one = torch.stack([per_image(image) for _ in range(n)])
    batch = (torch.full((n, 3, 32, 32), 200 / 255) - MEAN) / STD
    random_erasing_(batch, option["random_erasing"], torch.Generator().manual_seed(1))
    a, b = _erased_shapes(one_by_one), _erased_shapes(batch)
    # Two-sample KS at the 0.1% level: critical value 1.95 * sqrt(2 / n) (0.062 for n = 2000).
    critical = 1.95 * math.sqrt(2 / n)
    for column in range(2):  # heights, then widths
        assert _ks_statistic(a[:, column], b[:, column]) < critical, column
    assert _ks_statistic(a.prod(1), b.prod(1)) < critical  # areas
    erased_share = (b.prod(1) > 0).mean()
    assert abs(erased_share - 0.5) < 4 * math.sqrt(0.25 / n)  # erased with probability p
    # The scale range, 2% to 33% of the image, widened by the rounding of each side.
    areas = b.prod(1)[b.prod(1) > 0]
    assert 0.02 * 1024 - 17 <= areas.min() and areas.max() <= 0.33 * 1024 + 17


def test_the_erasing_distribution_test_sees_a_wrong_scale():
    # The check above must fail for a batch erased from another distribution (a larger scale).
    n = 2000
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    torch.manual_seed(0)
    per_image = build_transform("none", CIFAR10_MEAN, CIFAR10_STD, random_erasing=0.5)
    a = _erased_shapes(torch.stack([per_image(image) for _ in range(n)]))
    batch = (torch.full((n, 3, 32, 32), 200 / 255) - MEAN) / STD
    b = _erased_shapes(random_erasing_(batch, 0.5, torch.Generator().manual_seed(1), scale=(0.02, 0.4)))
    assert _ks_statistic(a.prod(1), b.prod(1)) > 1.95 * math.sqrt(2 / n)


# ---------------------------------------------------------------------------------------------
# Rotation: the same distribution on both loaders
# ---------------------------------------------------------------------------------------------


def _black_corners(batch: torch.Tensor) -> np.ndarray:
    """Pixels a rotation turned black in each normalised white image (white is about +2, black -2)."""
    return (batch < 0).all(dim=1).sum(dim=(1, 2)).numpy()


def _rotated_by_tensor_loader(n: int, rotate: float) -> torch.Tensor:
    white = torch.full((n, 32, 32, 3), 255, dtype=torch.uint8)
    loader = TensorLoader(
        white, torch.zeros(n, dtype=torch.long), torch.arange(n), n, train=True, augment="none", rotate=rotate, seed=1
    )
    ((x, _),) = list(loader)
    return x


def test_both_loaders_rotate_from_the_same_distribution():
    """The black corners' area grows with |angle|: its distribution over 2,000 white images is the
    same for torchvision's RandomRotation(15) one image at a time and the tensor loader's batch."""
    n = 2000
    image = np.full((32, 32, 3), 255, dtype=np.uint8)
    torch.manual_seed(0)
    per_image = build_transform("none", CIFAR10_MEAN, CIFAR10_STD, rotate=15)
    a = _black_corners(torch.stack([per_image(image) for _ in range(n)]))
    b = _black_corners(_rotated_by_tensor_loader(n, 15))
    critical = 1.95 * math.sqrt(2 / n)  # two-sample KS at the 0.1% level
    assert _ks_statistic(a, b) < critical
    # Most images lose corners (nearest pixels keep all of them below about 2°), none beyond 15°'s.
    assert (b > 0).mean() > 0.8 and b.max() <= a.max() + 8
    # The same test sees a wider angle (25°), and no rotation leaves no corner black.
    assert _ks_statistic(a, _black_corners(_rotated_by_tensor_loader(n, 25))) > critical
    assert _black_corners(_rotated_by_tensor_loader(64, 0)).max() == 0
    with pytest.raises(UserError, match="rotate is a largest angle in degrees"):
        CIFAR10DataModule(data_dir="unused", download=True, rotate=-1)
