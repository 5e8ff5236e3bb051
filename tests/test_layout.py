"""The package's layout: downloads once per node, one decoder and one normalisation for every path,
one report format, checkpoints whose hyperparameters predate later arguments still load, and the
rules of the layout."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, write_image_folder
from PIL import Image

from cifar_lightning.checkpoint import build_classifier
from cifar_lightning.constants import CIFAR10_CLASSES
from cifar_lightning.data import CIFAR10DataModule, datamodule
from cifar_lightning.inference import model_input
from cifar_lightning.module import ClassifierModule
from cifar_lightning.predict import load_input

DATA = Path(__file__).parent / "data"

# ---------------------------------------------------------------------------------------------
# Downloads happen in prepare_data
# ---------------------------------------------------------------------------------------------


def test_building_the_data_module_downloads_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datamodule, "download_dataset", lambda source: calls.append(source.root))
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "empty"), download=True)
    assert calls == [] and dm.source.needs_download and dm.class_names == list(CIFAR10_CLASSES)


RUNNER = textwrap.dedent(
    """
    import hashlib, os, sys
    from pathlib import Path

    import lightning.pytorch as pl

    from cifar_lightning.constants import CIFAR10_CLASSES
    from cifar_lightning.data import CIFAR10DataModule, datamodule
    from cifar_lightning.data.synthetic import write_image_folder
    from cifar_lightning.module import ClassifierModule

    data, out = Path(sys.argv[1]), Path(sys.argv[2])

    def fake_download(source):
        # Every call is counted: a download by each process would leave two lines.
        with open(out / "downloads.txt", "a") as f:
            f.write(f"{os.getpid()}\\n")
        write_image_folder(Path(source.root), classes=CIFAR10_CLASSES, n_train=4, n_test=2)

    datamodule.download_dataset = fake_download
    dm = CIFAR10DataModule(data_dir=str(data), download=True, val_size=4, batch_size=4, num_workers=0)
    model = ClassifierModule(arch="simple_cnn", lr=0.01)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(out))
    trainer.fit(model, datamodule=dm)
    digest = hashlib.sha1(dm.train_set.images.tobytes()).hexdigest()
    (out / f"rank{trainer.global_rank}.txt").write_text(f"{digest} {len(dm.train_set)}")
    """
)


def test_two_processes_download_once_and_read_the_same_data(tmp_path):
    runner, out = tmp_path / "runner.py", tmp_path / "out"
    runner.write_text(RUNNER)
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(runner), str(tmp_path / "data"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((out / "downloads.txt").read_text().split()) == 1  # one download for the node
    seen = {(out / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(seen) == 1 and seen.pop().endswith(" 36")  # both ranks read the same 40 - 4 images


# ---------------------------------------------------------------------------------------------
# One decoder, one normalisation: prediction prepares an image as the data module does
# ---------------------------------------------------------------------------------------------


def test_prediction_and_data_module_give_equal_tensors_exif_included(tmp_path):
    rng = np.random.default_rng(0)
    root = write_image_folder(tmp_path / "data", n_train=4, n_test=1)
    # A 48x40 photo stored sideways, with the EXIF tag that says to turn it 90 degrees clockwise.
    pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    photo = root / "test" / "cat" / "photo.png"
    Image.fromarray(pixels).save(photo, exif=exif)
    upright = tmp_path / "upright.png"
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270).save(upright)

    module = ClassifierModule(
        arch="simple_cnn",
        num_classes=3,
        class_names=["cat", "dog", "frog"],
        norm_mean=(0.3, 0.4, 0.5),
        norm_std=(0.2, 0.25, 0.3),
    )
    predicted = model_input(module, load_input(str(photo))[None])[0]
    assert torch.equal(predicted, model_input(module, load_input(str(upright))[None])[0])  # EXIF applied

    for loader in ("torchvision", "tensor"):
        dm = CIFAR10DataModule(
            data_dir=str(root),
            download=False,
            val_size=2,
            num_workers=0,
            batch_size=64,
            loader=loader,
            mean=(0.3, 0.4, 0.5),
            std=(0.2, 0.25, 0.3),
        )
        dm.setup("test")
        position = int(np.flatnonzero(dm.predict_set.indices == 1)[0])  # file order: cat/000.png, cat/photo.png
        x = torch.cat([x for x, _ in dm.predict_dataloader()])[position]
        assert torch.equal(x, predicted), loader


# ---------------------------------------------------------------------------------------------
# One report format
# ---------------------------------------------------------------------------------------------


def test_fit_and_evaluate_reports_share_their_keys(tiny_folder, tmp_path):
    from cifar_lightning.evaluation import evaluate_main
    from cifar_lightning.fit import fit_main

    fit = fit_main(
        [
            "--arch",
            "simple_cnn",
            "--data-dir",
            str(tiny_folder),
            "--output-dir",
            str(tmp_path),
            "--epochs",
            "1",
            "--num-workers",
            "0",
            "--batch-size",
            "8",
            "--val-size",
            "6",
            "--trainer.enable_progress_bar=false",
        ]
    )
    evaluated = evaluate_main([fit["checkpoint"], "--output-dir", str(tmp_path / "eval")])
    shared = {"arch", "checkpoint", "class_names", "test_acc", "test_loss", "per_class_acc", "test_images"}
    assert shared <= set(fit) and shared <= set(evaluated)
    for key in shared - {"checkpoint"}:
        assert (
            fit[key] == pytest.approx(evaluated[key], abs=1e-6)
            if isinstance(fit[key], float)
            else fit[key] == evaluated[key]
        )


# ---------------------------------------------------------------------------------------------
# A checkpoint written by an earlier version
# ---------------------------------------------------------------------------------------------


def test_a_checkpoint_written_by_an_earlier_version_still_loads():
    old = json.loads((DATA / "checkpoint_before_layout.json").read_text())
    fresh = ClassifierModule(**{k: v for k, v in old["hyper_parameters"].items() if not k.startswith("_")})
    module = build_classifier(
        {"hyper_parameters": old["hyper_parameters"], "state_dict": fresh.state_dict()}, "old.ckpt"
    )
    assert module.hparams.arch == "fastnet" and module.hparams.tta == "flip_translate"
    dm_args = {k: v for k, v in old["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    assert set(dm_args) <= set(CIFAR10DataModule.__init__.__code__.co_varnames)  # every saved argument
    # Callback states are stored under class names, which did not change.
    from cifar_lightning.callbacks import Lookahead, RandomState

    assert {Lookahead().state_key, RandomState().state_key} <= set(old["callback_state_keys"])


# ---------------------------------------------------------------------------------------------
# The rules of the layout
# ---------------------------------------------------------------------------------------------


def _package_modules(packages: tuple[str, ...] = ("cifar_lightning", "benchmarks")) -> dict[str, Path]:
    mods = {}
    for package in packages:
        for f in (REPO / package).rglob("*.py"):
            parts = f.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = f
    return mods


def _imported_names(f: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_no_module_over_500_lines():
    long = {name: n for name, f in _package_modules().items() if (n := len(f.read_text().splitlines())) > 500}
    assert long == {}


def test_no_import_cycles():
    mods = _package_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        # importing a package runs its __init__, which is how a package reaches its submodules
        graph[m] = {n for n in _imported_names(f) if n in mods and n != m and not m.startswith(n + ".")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    assert [m for m in graph if reaches(m, m, {m})] == []


def test_the_installed_package_needs_nothing_from_the_clone():
    # benchmarks/ is not installed: a module of the package that imported it would fail for a user.
    users = {
        m
        for m, f in _package_modules(("cifar_lightning",)).items()
        if any(n == "benchmarks" or n.startswith("benchmarks.") for n in _imported_names(f))
    }
    assert users == set()
    import configparser

    from setuptools import find_packages

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    installed = find_packages(str(REPO), include=cfg["options.packages.find"]["include"].split())
    assert "cifar_lightning" in installed and not any(p.startswith("benchmarks") for p in installed)
