"""The CUDA paths: ``pytest -m gpu``, the first section of the GPU command, cheapest decisive checks
first (they run in this file's order). Without CUDA every test here skips, with the reason.

Every network compiled is the GPU command's last section (``benchmarks/gpu_compile.py``), within
its own budget: 25 compilations do not belong before the measurements.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import REPO, labelled_image, write_image_folder
from test_policies import magnitudes

from benchmarks.gpu_sections import mixed_precision
from cifar_lightning import CIFAR10DataModule, ClassifierModule
from cifar_lightning.callbacks import StopOnNonFiniteLoss
from cifar_lightning.constants import CIFAR10_STD
from cifar_lightning.data import TensorLoader
from cifar_lightning.data.policies import GEOMETRIC, OPERATIONS
from cifar_lightning.data.transforms import POLICIES
from cifar_lightning.evaluation import evaluate_main
from cifar_lightning.export import export_main
from cifar_lightning.fit import fit_main
from cifar_lightning.predict import predict_main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU machine, with pytest -m gpu"),
]

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _fit(model: ClassifierModule, data: Path, tmp_path: Path, callbacks=(), data_kwargs=None, **trainer) -> pl.Trainer:
    settings = {"val_size": 6, "batch_size": 8, "num_workers": 0, "loader": "tensor", **(data_kwargs or {})}
    dm = CIFAR10DataModule(str(data), download=False, **settings)
    fit = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision=mixed_precision(),
        benchmark=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        **trainer,
    )
    fit.fit(model, datamodule=dm)
    return fit


def _test_images(n: int) -> torch.Tensor:
    """uint8 (2n, 3, 32, 32): n images that encode their class, and n of noise, which meet every
    rounding boundary."""
    rng = np.random.default_rng(0)
    labelled = np.stack([labelled_image(i % 3, rng) for i in range(n)])
    noise = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return torch.from_numpy(np.concatenate([labelled, noise])).permute(0, 3, 1, 2).contiguous()


def _grey_levels(cpu: torch.Tensor, gpu: torch.Tensor) -> float:
    """The largest difference of two normalised batches (B, 3, H, W), in grey levels of the image."""
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return float(((cpu - gpu.cpu()).abs() * std * 255).max())


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_operations_on_the_gpu_are_the_cpus_within_one_grey_level(policy):
    # A blend may round its last bit the other way on another device, which the cast to uint8 turns
    # into one grey level; an operation that moves pixels must take the same ones.
    images = _test_images(8)
    gpu_images = images.cuda()
    for op, magnitude in magnitudes(policy):
        m = torch.full((len(images),), magnitude)
        cpu = OPERATIONS[op](images, m)
        gpu = OPERATIONS[op](gpu_images, m if op in GEOMETRIC else m.cuda()).cpu()
        off = (cpu.int() - gpu.int()).abs()
        assert int(off.max()) <= (0 if op in GEOMETRIC else 1), (
            op,
            magnitude,
            int(off.max()),
            int(off.count_nonzero()),
        )


@pytest.mark.parametrize("augment", ["standard", "translate", "autoaugment", "randaugment", "trivialaugment"])
def test_tensor_loader_makes_the_cpus_batches_on_the_gpu(augment):
    # The draws are made on the CPU; every operation, policies included, computes the CPU's pixels
    # (within one grey level), and the crops, flips, rotations and erasures take the same ones.
    rng = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (64,), generator=rng)
    images = torch.stack(
        [torch.from_numpy(labelled_image(int(c), np.random.default_rng(i))) for i, c in enumerate(labels)]
    )
    kw = dict(
        train=True,
        augment=augment,
        cutout=8,
        random_erasing=0.5,
        rotate=15.0,
        seed=5,
        batch_size=16,
        flip_mode="alternating" if augment == "translate" else "random",
    )
    cpu = TensorLoader(images, labels, torch.arange(64), device="cpu", **kw)
    gpu = TensorLoader(images.cuda(), labels.cuda(), torch.arange(64), device="cuda", **kw)
    for epoch in range(2):
        for (x, y), (xg, yg) in zip(cpu, gpu):
            assert xg.is_cuda and torch.equal(y, yg.cpu())
            assert _grey_levels(x, xg) <= 1 + 1e-4, (augment, epoch)


def test_muon_learns_in_bf16(tiny_folder, tmp_path):
    model = ClassifierModule(arch="fastnet", num_classes=3, optimizer="muon", lr=0.05, muon_lr=0.1, channels_last=True)
    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    _fit(model, tiny_folder, tmp_path, callbacks=[Losses()], max_epochs=6, limit_val_batches=0)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])


def test_the_weight_average_lives_on_the_gpu(tiny_folder, tmp_path):
    from cifar_lightning.callbacks import EMA

    ema = EMA(decay=0.9)
    model = ClassifierModule(arch="simple_cnn", num_classes=3, channels_last=True)
    _fit(model, tiny_folder, tmp_path, callbacks=[ema], max_epochs=1)
    averaged = list(ema._average_model.module.parameters())
    assert averaged and all(p.is_cuda for p in averaged)  # no copy across to the CPU at every step
    assert all(torch.equal(a, p) for a, p in zip(averaged, model.parameters()))  # the fit ends on it


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> tuple[Path, Path]:
    """(best checkpoint, data) of a short fit on the GPU through scripts/fit.py's code."""
    base = tmp_path_factory.mktemp("gpu_run")
    data = write_image_folder(base / "data", n_train=12, n_test=4)
    report = fit_main(
        [
            "--data-dir",
            str(data),
            "--output-dir",
            str(base / "runs"),
            "--num-workers",
            "0",
            "--batch-size",
            "8",
            "--val-size",
            "6",
            "--arch",
            "simple_cnn",
            "--epochs",
            "2",
            "--accelerator",
            "gpu",
            "--devices",
            "1",
            "--precision",
            mixed_precision(),
            *QUIET,
        ]
    )
    return Path(report["checkpoint"]), data


def test_evaluate_predict_and_export_on_the_gpu(gpu_run, tmp_path):
    ckpt, data = gpu_run
    on_gpu = evaluate_main([str(ckpt), "--device", "cuda", "--output-dir", str(tmp_path / "gpu")])
    on_cpu = evaluate_main([str(ckpt), "--device", "cpu", "--output-dir", str(tmp_path / "cpu")])
    assert on_gpu["test_acc"] == pytest.approx(on_cpu["test_acc"], abs=1 / 12 + 1e-9)  # one image of 12 at most
    out = tmp_path / "predictions.json"
    assert predict_main([str(ckpt), str(data / "test"), "--device", "cuda", "--output", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 12
    assert export_main([str(ckpt), "--format", "torchscript", "--output", str(tmp_path / "model.pt")]) == 0


class NoWaitInAStep(pl.Callback):
    """``torch.cuda.set_sync_debug_mode("error")`` from the second training batch to the end of the
    epoch's last one: a call that waits for the GPU there (``.item()``, a copy to the host or from
    pageable memory, a ``nonzero`` or a boolean mask) raises. The first step is left out: cuDNN's
    autotuning and the first allocations wait by design."""

    steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            torch.cuda.set_sync_debug_mode("error")
        self.steps += batch_idx >= 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 >= trainer.num_training_batches:
            torch.cuda.set_sync_debug_mode("default")


#: Each augmentation of the tensor loader, and the batch mixes, as the recipes use them.
AUGMENTATIONS = {
    "standard": {"augment": "standard"},
    "translate_alternating": {"augment": "translate", "flip_mode": "alternating"},
    "autoaugment": {"augment": "autoaugment"},
    "randaugment": {"augment": "randaugment"},
    "trivialaugment": {"augment": "trivialaugment"},
    "cutout_erasing_rotate_mixup_cutmix": {
        "augment": "flip",
        "cutout": 8,
        "random_erasing": 0.5,
        "rotate": 15.0,
        "mixup": 1.0,
        "cutmix": 1.0,
    },
}


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_a_fastnet_epoch_waits_for_the_gpu_in_no_step(name, tmp_path):
    # The loader makes each batch on the GPU from draws made on the CPU, the step trains on it and
    # the loss guard adds up the loss: nothing in a step reads a result back or makes the GPU's
    # queue drain, so the CPU stays ahead of the GPU.
    if mixed_precision() != "bf16-mixed":
        pytest.skip("fp16 with loss scaling reads the scaler's overflow check at every step, by design")
    data = write_image_folder(tmp_path / "data", n_train=40, n_test=2)
    model = ClassifierModule(arch="fastnet", num_classes=3, channels_last=True, lr=0.05)
    watch = NoWaitInAStep()
    try:
        fit = _fit(
            model,
            data,
            tmp_path,
            callbacks=[watch, StopOnNonFiniteLoss(check_every=25)],
            data_kwargs={**AUGMENTATIONS[name], "val_size": 8, "batch_size": 16},
            max_epochs=1,
            limit_val_batches=0,
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert fit.global_step == 7 and watch.steps == 6  # 112 training images, batches of 16


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ddp_on_two_gpus(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=12, n_test=4)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "fit.py"),
            "--data-dir",
            str(data),
            "--output-dir",
            str(tmp_path / "runs"),
            "--num-workers",
            "0",
            "--batch-size",
            "4",
            "--val-size",
            "6",
            "--arch",
            "simple_cnn",
            "--epochs",
            "1",
            "--accelerator",
            "gpu",
            "--devices",
            "2",
            *QUIET,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next((tmp_path / "runs").rglob("test_report.json")).read_text())
    assert report["devices"] == 2 and report["test_images"] == 12
