"""The CUDA paths: ``pytest -m gpu``, the first section of the GPU command. Without CUDA every test
here skips, with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from cifar_lightning import CIFAR10DataModule, ClassifierModule
from cifar_lightning.data import TensorLoader
from cifar_lightning.evaluation import evaluate_main
from cifar_lightning.export import export_main
from cifar_lightning.fit import fit_main
from cifar_lightning.models import list_models
from cifar_lightning.predict import predict_main
from benchmarks.gpu_sections import mixed_precision
from conftest import REPO, labelled_image, write_image_folder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU machine, with pytest -m gpu"),
]

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _fit(model: ClassifierModule, data: Path, tmp_path: Path, **trainer) -> pl.Trainer:
    dm = CIFAR10DataModule(str(data), download=False, val_size=6, batch_size=8, num_workers=0, loader="tensor")
    fit = pl.Trainer(accelerator="gpu", devices=1, precision=mixed_precision(), benchmark=True, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path, **trainer)  # fmt: skip
    fit.fit(model, datamodule=dm)
    return fit


@pytest.mark.parametrize("arch", list_models())
def test_every_network_runs_the_fast_path(arch, tiny_folder, tmp_path):
    # Mixed precision, channels-last and a compiled network, as the GPU recipes run. The graphs go
    # through AOT autograd here; fastnet, the recipes' network, also compiles with inductor below.
    model = ClassifierModule(arch=arch, num_classes=3, channels_last=True, compile=True, compile_backend="aot_eager")
    fit = _fit(model, tiny_folder, tmp_path, fast_dev_run=True)
    assert fit.global_step == 1 and next(model.parameters()).is_cuda


def test_the_weight_average_lives_on_the_gpu(tiny_folder, tmp_path):
    from cifar_lightning.callbacks import EMA

    ema = EMA(decay=0.9)
    model = ClassifierModule(arch="simple_cnn", num_classes=3, channels_last=True)
    _fit(model, tiny_folder, tmp_path, max_epochs=1, callbacks=[ema])
    averaged = list(ema._average_model.module.parameters())
    assert averaged and all(p.is_cuda for p in averaged)  # no copy across to the CPU at every step
    assert all(torch.equal(a, p) for a, p in zip(averaged, model.parameters()))  # the fit ends on it


def test_fastnet_compiles_with_inductor_and_learns(tiny_folder, tmp_path):
    model = ClassifierModule(arch="fastnet", num_classes=3, channels_last=True, compile=True, lr=0.05)
    fit = _fit(model, tiny_folder, tmp_path, max_epochs=8, limit_val_batches=0)
    assert fit.global_step == 8 * 4
    (metrics,) = pl.Trainer(accelerator="gpu", devices=1, logger=False, enable_progress_bar=False).validate(
        model, datamodule=CIFAR10DataModule(str(tiny_folder), download=False, val_size=6, num_workers=0), verbose=False
    )
    assert metrics["val/acc"] > 0.5  # the classes are coloured patterns: far above a third


@pytest.mark.parametrize("augment", ["standard", "autoaugment", "randaugment", "trivialaugment"])
def test_tensor_loader_makes_the_same_batches_on_the_gpu(tmp_path, augment):
    # The draws are made on the CPU; every operation, policies included, computes the same pixels.
    rng = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (64,), generator=rng)
    images = torch.stack([torch.from_numpy(labelled_image(int(c), np.random.default_rng(i))) for i, c in enumerate(labels)])
    kw = dict(train=True, augment=augment, cutout=8, random_erasing=0.5, seed=5, batch_size=16)
    cpu = TensorLoader(images, labels, torch.arange(64), device="cpu", **kw)
    gpu = TensorLoader(images.cuda(), labels.cuda(), torch.arange(64), device="cuda", **kw)
    for (x, y), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and torch.equal(y, yg.cpu())
        torch.testing.assert_close(x, xg.cpu(), atol=1e-6, rtol=0)


def test_muon_learns_in_bf16(tiny_folder, tmp_path):
    model = ClassifierModule(arch="fastnet", num_classes=3, optimizer="muon", lr=0.05, muon_lr=0.1, channels_last=True)
    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    _fit(model, tiny_folder, tmp_path, max_epochs=6, limit_val_batches=0, callbacks=[Losses()])
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> tuple[Path, Path]:
    """(best checkpoint, data) of a short fit on the GPU through scripts/fit.py's code."""
    base = tmp_path_factory.mktemp("gpu_run")
    data = write_image_folder(base / "data", n_train=12, n_test=4)
    report = fit_main([
        "--data-dir", str(data), "--output-dir", str(base / "runs"), "--num-workers", "0", "--batch-size", "8",
        "--val-size", "6", "--arch", "simple_cnn", "--epochs", "2", "--accelerator", "gpu", "--devices", "1",
        "--precision", mixed_precision(), *QUIET,
    ])  # fmt: skip
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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ddp_on_two_gpus(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=12, n_test=4)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fit.py"), "--data-dir", str(data), "--output-dir", str(tmp_path / "runs"),
         "--num-workers", "0", "--batch-size", "4", "--val-size", "6", "--arch", "simple_cnn", "--epochs", "1",
         "--accelerator", "gpu", "--devices", "2", *QUIET],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next((tmp_path / "runs").rglob("test_report.json")).read_text())
    assert report["devices"] == 2 and report["test_images"] == 12
