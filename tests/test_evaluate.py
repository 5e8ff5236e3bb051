"""Evaluation, checkpoint loading and the plots: files, numbers that agree, clear errors.

``trained_run`` fits one tiny simple_cnn per session; test_predict, test_export and
test_notebook import it, so the whole group pays for a single fit.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

from cifar_lightning import CIFAR10DataModule, create_model
from cifar_lightning.callbacks import HistoryPlot
from cifar_lightning.checkpoint import check_compatible, load_classifier
from cifar_lightning.errors import UserError
from cifar_lightning.evaluation import confused_pairs, default_output_dir, evaluate_main
from cifar_lightning.fit import fit_main
from cifar_lightning.plots import history_figure, plot_history_main, read_history

CLASSES = ("cat", "dog", "frog", "ship")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(last.ckpt, data folder) of simple_cnn fitted 2 epochs on 4 tiny classes, once per session.

    Two test images are filed under a wrong class, so the model makes confident mistakes and the
    confusion matrix has off-diagonal cells. The run also has the ``HistoryPlot`` callback.
    """
    base = tmp_path_factory.getbasetemp() / "trained_run"
    ckpt = base / "runs" / "simple_cnn" / "version_0" / "checkpoints" / "last.ckpt"
    data = base / "data"
    if not ckpt.is_file():
        write_image_folder(data, classes=CLASSES, n_train=10, n_test=6)
        (data / "test" / "cat" / "000.png").rename(data / "test" / "dog" / "was_cat.png")
        (data / "test" / "frog" / "000.png").rename(data / "test" / "ship" / "was_frog.png")
        fit_main(
            [
                "--data-dir",
                str(data),
                "--output-dir",
                str(base / "runs"),
                "--num-workers",
                "0",
                "--batch-size",
                "4",
                "--val-size",
                "6",
                "--arch",
                "simple_cnn",
                "--epochs",
                "2",
                "--lr",
                "0.01",
                "--trainer.callbacks+=cifar_lightning.callbacks.HistoryPlot",
                *QUIET,
            ]
        )
    return ckpt, data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluated(run):
    """scripts/evaluate.py with every default (data dir from the checkpoint, output beside it) and --tta."""
    ckpt, _ = run
    report = evaluate_main([str(ckpt), "--tta", "--batch-size", "7"])
    return report, default_output_dir(ckpt)


def assert_png(path: Path, min_size: int = 200) -> None:
    assert path.is_file(), path
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        assert min(img.size) >= min_size, img.size


# ---------------------------------------------------------------------------------------------
# scripts/evaluate.py
# ---------------------------------------------------------------------------------------------


def test_evaluate_writes_report_and_plots(run, evaluated):
    ckpt, data = run
    report, out = evaluated
    assert out == ckpt.parent.parent / "eval" / "last"
    for name in ("confusion_matrix", "per_class_accuracy", "predictions_grid", "mistakes"):
        assert_png(out / f"{name}.png")
    saved = json.loads((out / "report.json").read_text())
    assert saved == report
    assert saved["data_dir"] == str(data)  # found in the checkpoint, not passed
    for key in (
        "test_acc",
        "test_loss",
        "per_class_acc",
        "per_class",
        "confusion_matrix",
        "confused_pairs",
        "confident_mistakes",
        "tta",
    ):
        assert key in saved
    assert saved["class_names"] == list(CLASSES) and saved["test_images"] == 24
    assert set(saved["tta"]) == {"mode", "test_acc", "gain", "test_loss", "per_class_acc"}
    assert saved["tta"]["mode"] == "flip"  # what a bare --tta means


def test_report_numbers_agree_with_the_confusion_matrix(evaluated):
    report, _ = evaluated
    m = np.array(report["confusion_matrix"])
    assert m.sum() == report["test_images"]
    assert report["test_acc"] == pytest.approx(np.trace(m) / m.sum(), abs=1e-6)
    for i, name in enumerate(report["class_names"]):
        per = report["per_class"][name]
        assert per["support"] == m[i].sum()
        assert per["accuracy"] == pytest.approx(m[i, i] / m[i].sum(), abs=1e-6)
        assert per["recall"] == pytest.approx(per["accuracy"], abs=1e-6)
        assert per["precision"] == pytest.approx(m[i, i] / max(m[:, i].sum(), 1), abs=1e-6)
    # the two mislabelled test images are mistakes, and the pairs come from the matrix
    assert m[1, 0] >= 1 and m[3, 2] >= 1
    names = report["class_names"]
    for pair in report["confused_pairs"]:
        assert pair["count"] == m[names.index(pair["true"]), names.index(pair["predicted"])] > 0
    mistakes = report["confident_mistakes"]
    assert len(mistakes) == min(16, m.sum() - np.trace(m))
    assert all(x["predicted"] != x["true"] for x in mistakes)
    assert [x["confidence"] for x in mistakes] == sorted((x["confidence"] for x in mistakes), reverse=True)


def lightning_test(ckpt: Path, data: Path) -> dict[str, float]:
    dm = CIFAR10DataModule(str(data), download=False, num_workers=0, batch_size=5, val_size=6)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.test(load_classifier(ckpt), datamodule=dm, verbose=False)
    return metrics


def test_evaluation_matches_lightning_test(run, evaluated):
    ckpt, data = run
    report, _ = evaluated
    lightning = lightning_test(ckpt, data)
    assert report["test_acc"] == pytest.approx(lightning["test/acc"], abs=1e-6)
    assert report["test_loss"] == pytest.approx(lightning["test/loss"], rel=1e-4, abs=1e-6)
    for name in CLASSES:
        assert report["per_class"][name]["accuracy"] == pytest.approx(lightning[f"test/acc/{name}"], abs=1e-6)


def test_checkpoint_trained_with_tta_is_evaluated_as_lightning_tests_it(run, tmp_path):
    # trainer.test uses the checkpoint's own tta and label smoothing; so does evaluate by default.
    ckpt, data = run
    ckpt_dict = torch.load(ckpt, weights_only=True)
    ckpt_dict["hyper_parameters"].update(tta="flip", label_smoothing=0.1)
    torch.save(ckpt_dict, tmp_path / "tta.ckpt")
    report = evaluate_main([str(tmp_path / "tta.ckpt"), "--output-dir", str(tmp_path / "out")])
    lightning = lightning_test(tmp_path / "tta.ckpt", data)
    assert report["tta"]["mode"] == "flip"
    assert report["tta"]["test_acc"] == pytest.approx(lightning["test/acc"], abs=1e-6)
    assert report["tta"]["test_loss"] == pytest.approx(lightning["test/loss"], rel=1e-4, abs=1e-6)
    assert report["test_loss"] != pytest.approx(report["tta"]["test_loss"], rel=1e-6)


def test_evaluate_refuses_data_with_other_classes(run, tmp_path, capsys):
    ckpt, _ = run
    other = write_image_folder(tmp_path / "other", classes=("apple", "pear"), n_train=1, n_test=1)
    with pytest.raises(SystemExit) as exc:
        evaluate_main([str(ckpt), "--data-dir", str(other), "--output-dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(ckpt) in err
    assert "['cat', 'dog', 'frog', 'ship']" in err and "['apple', 'pear']" in err
    assert not (tmp_path / "out").exists()


def test_check_compatible_names_arch_and_class_count(run):
    module = load_classifier(run[0])
    check_compatible(module, arch="simple_cnn", num_classes=4, class_names=CLASSES)
    with pytest.raises(UserError, match="is a 'simple_cnn' model, but the data expects 'resnet18'"):
        check_compatible(module, arch="resnet18")
    with pytest.raises(UserError, match="predicts 4 classes, but the data has 10"):
        check_compatible(module, num_classes=10)
    with pytest.raises(UserError, match="the same names in another order"):
        check_compatible(module, class_names=CLASSES[::-1])


def test_confused_pairs_directed_and_symmetric():
    m = [[5, 3, 0], [1, 4, 2], [0, 2, 6]]
    names = ["a", "b", "c"]
    assert confused_pairs(m, names, k=2) == [
        {"true": "a", "predicted": "b", "count": 3},
        {"true": "b", "predicted": "c", "count": 2},
    ]
    assert confused_pairs(m, names, symmetric=True) == [
        {"classes": ["a", "b"], "count": 4},
        {"classes": ["b", "c"], "count": 4},
    ]


# ---------------------------------------------------------------------------------------------
# Checkpoints that are not ours
# ---------------------------------------------------------------------------------------------


class NotAllowed:
    """Pickled below as a stand-in for another program's objects."""


def write_bad_file(kind: str, path: Path, good: Path) -> Path:
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign-pickle":
        path.write_bytes(pickle.dumps({"thing": NotAllowed()}))
    elif kind == "whole-model":
        torch.save(create_model("simple_cnn", num_classes=4), path)
    elif kind == "state-dict":
        torch.save(torch.load(good, weights_only=True)["state_dict"], path)
    elif kind == "other-dict":
        torch.save({"epoch": 3, "weights": [1, 2]}, path)
    elif kind == "other-lightning-model":
        ckpt = torch.load(good, weights_only=True)
        ckpt["hyper_parameters"] = {"hidden": 64}
        torch.save(ckpt, path)
    elif kind == "mismatched-weights":
        ckpt = torch.load(good, weights_only=True)
        ckpt["hyper_parameters"]["arch"] = "lenet5"
        torch.save(ckpt, path)
    elif kind == "folder":
        path.mkdir()
    return path


BAD_CHECKPOINTS = {
    "missing": "does not exist",
    "folder": "is a folder, not a checkpoint file",
    "empty": "is empty",
    "truncated": "is truncated or corrupt",
    "random-bytes": "is not a PyTorch checkpoint",
    "foreign-pickle": "is not a PyTorch checkpoint",
    "whole-model": r"holds pickled Python objects \(torch\.nn\.modules\.container\.Sequential\)",
    "state-dict": "is a plain state dict",
    "other-dict": "is not a checkpoint of this project: it has no 'state_dict'",
    "other-lightning-model": "hyper_parameters lack arch, num_classes",
    "mismatched-weights": "weights do not fit the architecture 'lenet5'",
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_bad_checkpoint_gives_user_error_naming_the_file(kind, run, tmp_path):
    path = write_bad_file(kind, tmp_path / f"{kind}.ckpt", run[0])
    with pytest.raises(UserError, match=BAD_CHECKPOINTS[kind]) as exc:
        load_classifier(path)
    assert str(path) in str(exc.value)


def test_bad_checkpoint_on_the_command_line_exits_2(run, tmp_path, capsys):
    path = write_bad_file("truncated", tmp_path / "cut.ckpt", run[0])
    with pytest.raises(SystemExit) as exc:
        evaluate_main([str(path), "--data-dir", str(run[1])])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: checkpoint {path} is truncated or corrupt")


# ---------------------------------------------------------------------------------------------
# Training history
# ---------------------------------------------------------------------------------------------


def test_history_plot_callback_wrote_history_png(run):
    assert_png(run[0].parent.parent / "history.png")


def test_plot_history_script_and_reader(run, tmp_path, capsys):
    run_dir = run[0].parent.parent
    out = plot_history_main([str(run_dir), "--output", str(tmp_path / "h.png")])
    assert out == tmp_path / "h.png" and "history:" in capsys.readouterr().out
    assert_png(out)
    history = read_history(run_dir / "metrics.csv")
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        epochs, values = history[key]
        assert list(epochs) == [0, 1] and np.isfinite(values).all()
    # the LR is logged at each epoch's first step, without an epoch: it lands on epochs 0 and 1
    epochs, lrs = history["lr-SGD"]
    assert list(epochs) == [0.0, 1.0] and lrs[0] == pytest.approx(0.01) and lrs[1] < lrs[0]


def test_read_history_places_step_level_learning_rates_at_fractional_epochs(tmp_path):
    # Two epochs of 4 steps; validation twice in epoch 0 (the last value counts); the LR is
    # logged every 2 steps with no epoch, under the optimizer's name; a test row at the end.
    rows = [
        "epoch,step,lr-AdamW,train/loss,train/acc,val/loss,val/acc,test/acc",
        ",0,0.001,,,,,",
        ",2,0.0008,,,,,",
        "0,1,,,,0.9,0.5,",
        "0,3,,,,0.8,0.6,",
        "0,3,,1.2,0.4,,,",
        ",4,0.0006,,,,,",
        ",6,0.0004,,,,,",
        "1,7,,,,0.7,0.7,",
        "1,7,,1.0,0.55,,,",
        "2,8,,,,,,0.66",
    ]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    history = read_history(tmp_path / "metrics.csv")
    assert set(history) == {"train/loss", "train/acc", "val/loss", "val/acc", "lr-AdamW"}
    np.testing.assert_allclose(history["val/acc"][1], [0.6, 0.7])
    np.testing.assert_allclose(history["lr-AdamW"][0], [0.0, 0.5, 1.0, 1.5])
    fig = history_figure(history, title="run X")
    assert fig.get_suptitle() == "run X"
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "learning rate"]
    # epochs count from 1, as the run's lines count them
    assert list(fig.axes[1].lines[1].get_xdata()) == [1, 2]


def test_the_history_of_a_one_epoch_run_has_an_epoch_wide_axis():
    one = {"train/loss": (np.array([0.0]), np.array([1.5])), "val/acc": (np.array([0.0]), np.array([0.4]))}
    fig = history_figure(one)
    for ax in fig.axes[:2]:
        left, right = ax.get_xlim()
        assert (left, right) == (0.5, 1.5)
        ticks = [t for t in ax.get_xticks() if left <= t <= right]
        assert ticks == [1.0], ticks


def test_plot_history_of_a_folder_without_metrics_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        plot_history_main([str(tmp_path)])
    assert exc.value.code == 2
    assert f"no metrics.csv at {tmp_path / 'metrics.csv'}" in capsys.readouterr().err


def test_history_plot_without_csv_logger_does_nothing(tiny_folder, tmp_path):
    dm = CIFAR10DataModule(str(tiny_folder), download=False, val_size=6, num_workers=0, batch_size=8)
    from cifar_lightning import ClassifierModule

    model = ClassifierModule(arch="simple_cnn", num_classes=3, class_names=dm.class_names, lr=0.01)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[HistoryPlot()],
    )
    trainer.fit(model, datamodule=dm)
    assert not list(tmp_path.rglob("history.png"))
