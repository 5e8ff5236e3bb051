"""Many classes: CIFAR-100's 100 (in 20 superclasses) and a folder of 3, through the entry points.

The printed report lists the worst and best classes beyond 20 and the JSON every class; the
figures stay readable and of bounded size; superclass and top-5 accuracy agree with a count by
hand; prediction and export handle 100 classes. The checkpoints are made without a fit: a
``ClassifierModule`` trained a few full-batch steps by hand on a tiny image folder (so its
predictions vary), saved by a Lightning ``Trainer`` with the data module's hyperparameters that a
fit would have stored beside the weights. The 100-class folder has CIFAR-100's class names, so
``dataset="cifar100"`` reads it with CIFAR-100's superclasses.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_image_folder
from PIL import Image

from cifar_lightning.checkpoint import load_classifier
from cifar_lightning.constants import CIFAR10_CLASSES, CIFAR100_CLASSES, CIFAR100_SUPERCLASSES
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.evaluation import evaluate_main
from cifar_lightning.export import export_main
from cifar_lightning.fit import fit_main
from cifar_lightning.inference import model_input, predict_logits
from cifar_lightning.loggers import evaluation_numbers
from cifar_lightning.module import ClassifierModule
from cifar_lightning.plots import confusion_matrix_figure, per_class_accuracy_figure
from cifar_lightning.predict import predict_main
from cifar_lightning.report import print_report, table_classes

SUPERCLASS_NAMES = list(CIFAR100_SUPERCLASSES)
#: The superclass of each CIFAR-100 class, in label order.
GROUPS = [
    next(g for g, name in enumerate(SUPERCLASS_NAMES) if c in CIFAR100_SUPERCLASSES[name]) for c in CIFAR100_CLASSES
]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def make_checkpoint(path: Path, data: Path, dataset: str, superclass_names=None, superclasses=None) -> Path:
    """A lenet5 checkpoint of ``data`` read as ``dataset``, fitted 15 full-batch Adam steps on its
    training split: about 60% right on the 100-class folder, so there are mistakes to count.

    What the CLI links from the data (classes, normalisation, CIFAR-100's superclasses) comes from
    the data module; ``superclass_names`` and ``superclasses`` group the classes of another dataset.
    """
    dm = CIFAR10DataModule(str(data), dataset=dataset, download=False, num_workers=0, val_size=0.1)
    dm.setup("fit")
    idx = dm.train_set.indices
    torch.manual_seed(0)
    module = ClassifierModule(
        arch="lenet5",
        num_classes=dm.num_classes,
        class_names=dm.class_names,
        norm_mean=dm.norm_mean,
        norm_std=dm.norm_std,
        superclass_names=superclass_names or dm.superclass_names,
        superclasses=superclasses or dm.superclasses,
    )
    x, y = model_input(module, dm.train_set.images[idx]), torch.as_tensor(dm.train_set.labels[idx])
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    for _ in range(15):
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["datamodule_hyper_parameters"] = dict(dm.hparams)  # what a fit stores: data_dir, dataset, split
    torch.save(ckpt, path)
    return path


def held_out_test(data: Path, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    return CIFAR10DataModule(str(data), dataset=dataset, download=False, num_workers=0).split_arrays("test")


def table_rows(printed: str) -> list[str]:
    """The first cell of each body row of the printed per-class table."""
    return [line.split("│")[1].strip() for line in printed.splitlines() if line.startswith("│")]


@pytest.fixture(scope="module")
def folder100(tmp_path_factory) -> Iterator[Path]:
    """CIFAR-100's class folders, 2 training and 2 test images each; the module's fixtures keep
    their caches (decoded arrays, corrupted images) beside it, as conftest's autouse fixture does
    for each test, which runs after them."""
    root = tmp_path_factory.mktemp("c100")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFAR_LIGHTNING_CACHE", str(root / "cache"))
        yield write_image_folder(root / "data", classes=CIFAR100_CLASSES, n_train=2, n_test=2)


@pytest.fixture(scope="module")
def ckpt100(folder100) -> Path:
    return make_checkpoint(folder100.parent / "c100.ckpt", folder100, "cifar100")


@pytest.fixture(scope="module")
def evaluated100(ckpt100, folder100) -> tuple[dict, str, Path]:
    """(report, printed output, output folder) of scripts/evaluate.py with --calibration and --corruptions."""
    out = folder100.parent / "eval"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = evaluate_main(
            [str(ckpt100), "--output-dir", str(out), "--calibration", "--corruptions", "--corruptions-subset", "8"]
        )
    return report, printed.getvalue(), out


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


# ---------------------------------------------------------------------------------------------
# The report: printed and JSON
# ---------------------------------------------------------------------------------------------


def test_report_of_100_classes_prints_worst_and_best_and_saves_every_class(evaluated100, folder100):
    report, printed, out = evaluated100
    saved = json.loads((out / "report.json").read_text())
    assert saved == report and saved["data_dir"] == str(folder100)  # found in the checkpoint
    assert list(saved["per_class_acc"]) == list(CIFAR100_CLASSES) and len(saved["per_class"]) == 100
    assert np.array(saved["confusion_matrix"]).shape == (100, 100)
    acc = saved["per_class_acc"]
    assert min(acc.values()) < max(acc.values())  # the worst classes are not the best ones
    ranked = sorted(acc, key=lambda n: (acc[n], n))
    assert table_rows(printed) == [*ranked[:5], "... 90 classes between", *ranked[-5:], "overall"]
    assert "the 5 worst and 5 best of 100 classes by accuracy" in printed
    # The 10-class report's table holds every class: here at most the 10 shown are in it.
    assert sum(name in table_rows(printed) for name in CIFAR100_CLASSES) == 10
    m = np.array(saved["confusion_matrix"])
    off_diagonal = int(np.count_nonzero(m - np.diag(np.diag(m))))
    assert len(saved["confused_pairs"]) == min(20, off_diagonal) > 10  # 20 of them beyond 20 classes, not 10
    # Calibration and corruptions run on 100 classes too.
    assert saved["calibration"]["fitted_on"] == "validation split (20 images)"
    assert set(saved["corruptions"]["accuracy"]) and saved["corruptions"]["images"] == 8


def test_superclass_and_top5_accuracy_equal_a_count_by_hand(ckpt100, folder100, evaluated100):
    report, printed, _ = evaluated100
    images, labels = held_out_test(folder100, "cifar100")
    logits = predict_logits(load_classifier(ckpt100), images)
    groups = np.array(GROUPS)
    preds = logits.argmax(dim=1).numpy()
    super_acc = float(np.mean(groups[preds] == groups[labels]))
    top5 = float(np.mean([y in row for y, row in zip(labels, logits.topk(5, dim=1).indices.tolist())]))
    assert report["test_acc_superclass"] == pytest.approx(super_acc, abs=1e-6)
    assert report["test_acc_top5"] == pytest.approx(top5, abs=1e-6)
    assert report["test_acc"] < report["test_acc_top5"] and report["test_acc"] < report["test_acc_superclass"]
    per_group = report["per_superclass_acc"]
    assert list(per_group) == SUPERCLASS_NAMES and report["superclass_names"] == SUPERCLASS_NAMES
    for g, name in enumerate(SUPERCLASS_NAMES):
        mine = groups[labels] == g
        assert per_group[name] == pytest.approx(float(np.mean(groups[preds[mine]] == g)), abs=1e-6)
    assert f"top-5 accuracy {100 * top5:.2f}%; superclass accuracy {100 * super_acc:.2f}%" in printed
    numbers = evaluation_numbers(report)
    assert numbers["eval/test_acc_superclass"] == report["test_acc_superclass"]
    assert numbers["eval/test_acc_top5"] == report["test_acc_top5"]


def test_ten_classes_print_every_class_in_label_order_as_before(capsys):
    acc = {name: (i % 4) / 4 for i, name in enumerate(CIFAR10_CLASSES)}
    print_report(
        {
            "arch": "lenet5",
            "test_images": 100,
            "per_class_acc": acc,
            "test_acc": 0.4,
            "test_loss": 1.5,
            "checkpoint": None,
        }
    )
    printed = capsys.readouterr().out
    assert table_rows(printed) == [*CIFAR10_CLASSES, "overall"]
    assert "worst" not in printed and "top-5" not in printed and "superclass" not in printed
    # The table keeps every class up to 20 of them; one more and it shows 5 at each end.
    assert table_classes({f"c{i}": 0.5 for i in range(20)}) == [f"c{i}" for i in range(20)]
    assert len(table_classes({f"c{i}": 0.5 for i in range(21)})) == 11


def test_three_classes_with_groups_keep_every_row_and_give_superclass_accuracy(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", classes=("cat", "dog", "truck"), n_train=6, n_test=4)
    ckpt = make_checkpoint(tmp_path / "c3.ckpt", data, "folder", ["animal", "vehicle"], [0, 0, 1])
    # Two test images filed under a wrong class: a mistake within the animals, one across the groups.
    (data / "test" / "cat" / "000.png").rename(data / "test" / "dog" / "was_cat.png")
    (data / "test" / "truck" / "000.png").rename(data / "test" / "cat" / "was_truck.png")
    report = evaluate_main([str(ckpt), "--output-dir", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    assert table_rows(printed) == ["cat", "dog", "truck", "overall"]
    assert "test_acc_top5" not in report and "top-5" not in printed  # 3 classes: top-5 says nothing
    images, labels = held_out_test(data, "folder")
    preds = predict_logits(load_classifier(ckpt), images).argmax(dim=1).numpy()
    groups = np.array([0, 0, 1])
    assert report["test_acc_superclass"] == pytest.approx(float(np.mean(groups[preds] == groups[labels])), abs=1e-6)
    assert report["test_acc"] < report["test_acc_superclass"] < 1
    assert "superclass accuracy" in printed and "2 superclasses" in printed

    # --top-k beyond the 3 classes lists the 3, best first.
    out = tmp_path / "p.json"
    assert predict_main([str(ckpt), str(data / "test"), "--top-k", "5", "--output", str(out)]) == 0
    for row in json.loads(out.read_text()):
        assert sorted(p["class"] for p in row["predictions"]) == ["cat", "dog", "truck"]


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def test_figures_of_100_classes_are_written_at_a_bounded_size(evaluated100):
    report, _, out = evaluated100
    for name in ("confusion_matrix", "confused_pairs", "per_class_accuracy", "predictions_grid", "mistakes"):
        assert report["files"][name] == str(out / f"{name}.png")
    # Drawn at the sizes of 10 classes scaled up, these were 6,200 and 4,650 pixels tall.
    assert max(png_size(out / "confusion_matrix.png")) <= 1900
    assert png_size(out / "per_class_accuracy.png")[1] <= 1200
    assert png_size(out / "confused_pairs.png")[1] <= 1000


def test_confusion_matrix_of_many_classes_is_sorted_without_numbers_and_of_ten_as_before():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 3, (100, 100)) + np.diag(rng.integers(0, 20, 100))
    names = list(CIFAR100_CLASSES)
    ax = confusion_matrix_figure(m, names, groups=GROUPS).axes[0]
    assert not ax.texts  # no per-cell numbers
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(shown) == sorted(names)  # 100 rows at 18 inches: every label fits
    assert [GROUPS[names.index(n)] for n in shown] == sorted(GROUPS)  # grouped by superclass
    acc = np.diag(m) / m.sum(axis=1)
    for g in range(20):  # the best class of each group first
        within = [acc[names.index(n)] for n in shown if GROUPS[names.index(n)] == g]
        assert within == sorted(within, reverse=True)
    ax = confusion_matrix_figure(m, names).axes[0]
    shown = [acc[names.index(t.get_text())] for t in ax.get_yticklabels()]
    assert shown == sorted(shown, reverse=True)  # without groups: by accuracy, best first
    # 1,000 classes: the labels are thinned to what the fixed size shows.
    big = confusion_matrix_figure(np.eye(1000, dtype=int), [f"c{i}" for i in range(1000)]).axes[0]
    assert 100 < len(big.get_yticklabels()) < 500 and max(big.figure.get_size_inches()) <= 19

    ax = confusion_matrix_figure(m[:10, :10], names[:10]).axes[0]
    assert len(ax.texts) == 100 and [t.get_text() for t in ax.get_yticklabels()] == names[:10]


def test_per_class_bars_of_many_classes_show_the_best_and_worst_ten():
    acc = {name: i / 100 for i, name in enumerate(CIFAR100_CLASSES)}
    ax = per_class_accuracy_figure(acc, overall=0.5).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [*CIFAR100_CLASSES[:-11:-1], *CIFAR100_CLASSES[9::-1]]  # best first, then the worst
    assert len(ax.patches) == 20 and "10 best and 10 worst of 100" in ax.get_title()
    ax = per_class_accuracy_figure(dict(list(acc.items())[:10])).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(CIFAR100_CLASSES[:10])  # 10: label order


# ---------------------------------------------------------------------------------------------
# Prediction, export, fit and the dashboards
# ---------------------------------------------------------------------------------------------


def test_predict_100_classes_top5_and_a_top_k_above_them(ckpt100, folder100, tmp_path):
    files = sorted((folder100 / "test").rglob("*.png"))[:6]
    out = tmp_path / "p.json"
    assert predict_main([str(ckpt100), *map(str, files), "--top-k", "5", "--output", str(out)]) == 0
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    top = torch.softmax(predict_logits(load_classifier(ckpt100), images), dim=1).topk(5, dim=1)
    for row, values, indices in zip(json.loads(out.read_text()), top.values, top.indices):
        assert [p["class"] for p in row["predictions"]] == [CIFAR100_CLASSES[i] for i in indices]
        assert [p["probability"] for p in row["predictions"]] == pytest.approx(values.tolist(), abs=1e-6)

    out = tmp_path / "p.csv"
    assert predict_main([str(ckpt100), str(files[0]), "--top-k", "150", "--output", str(out)]) == 0
    (row,) = list(csv.DictReader(out.open()))
    assert "class_100" in row and "class_101" not in row  # clipped to the checkpoint's classes
    assert sorted(row[f"class_{r}"] for r in range(1, 101)) == sorted(CIFAR100_CLASSES)


def test_export_metadata_holds_100_names_and_the_superclasses(ckpt100, folder100, tmp_path, capsys):
    path = tmp_path / "m.pt"
    args = ["--format", "torchscript", "--output", str(path), "--data-dir", str(folder100)]
    assert export_main([str(ckpt100), *args]) == 0
    assert "64 test images from" in capsys.readouterr().out
    extra = {"metadata.json": ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")  # still libtorch's format
        torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["metadata.json"])
    assert meta["num_classes"] == "100" and json.loads(meta["class_names"]) == list(CIFAR100_CLASSES)
    assert json.loads(meta["superclass_names"]) == SUPERCLASS_NAMES and json.loads(meta["superclasses"]) == GROUPS


def test_fit_report_has_top5_and_superclass_accuracy_as_evaluate_counts_them(folder100, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The superclasses come from the data, linked into the model by the CLI.
    report = fit_main(
        [
            "--arch",
            "lenet5",
            "--epochs",
            "1",
            "--data-dir",
            str(folder100),
            "--dataset",
            "cifar100",
            "--output-dir",
            str(tmp_path / "runs"),
            "--num-workers",
            "0",
            "--batch-size",
            "64",
            "--val-size",
            "20",
            "--lr",
            "0.01",
            "--logger",
            "tensorboard",
            *QUIET,
        ]
    )
    printed = capsys.readouterr().out
    assert "the 5 worst and 5 best of 100 classes" in printed and "superclass accuracy" in printed
    assert len(report["per_class_acc"]) == 100
    evaluated = evaluate_main([report["checkpoint"], "--output-dir", str(tmp_path / "eval")])
    for key in ("test_acc", "test_acc_top5", "test_acc_superclass"):
        assert report[key] == pytest.approx(evaluated[key], abs=1e-6), key
    saved = json.loads(Path(report["report_path"]).read_text())
    assert saved["test_acc_superclass"] == report["test_acc_superclass"]

    images = set()
    for events in (Path(report["report_path"]).parent / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        images |= set(acc.Tags()["images"])
    assert {"test/confusion_matrix", "test/confused_pairs"} <= images


def test_wandb_gets_the_pairs_and_a_confusion_matrix_it_can_hold(monkeypatch):
    import wandb

    from cifar_lightning.callbacks.dashboards import _to_wandb

    logged: dict = {}
    logger = SimpleNamespace(experiment=SimpleNamespace(log=logged.update))
    for n in (10, 30, 101):
        logged.clear()
        confusion = torch.eye(n, dtype=torch.long) * 3
        confusion[0, 1] = 2
        _to_wandb(logger, confusion, None, [f"c{i}" for i in range(n)])
        # W&B keeps 10,000 rows of its matrix table: one per cell, 100 classes; beyond, a figure.
        assert isinstance(logged["test/confusion_matrix"], wandb.Image) == (n > 100), n
        assert ("test/confused_pairs" in logged) == (n > 20), n
        if n > 20:
            assert logged["test/confused_pairs"].data[0] == ["c0", "c1", 2]
