"""scripts/fit.py end to end: every architecture, checkpoints, real data, DDP and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import REPO, arch_params, write_image_folder

from cifar_lightning import CIFAR10DataModule, ClassifierModule
from cifar_lightning.fit import expand_aliases, fit_main

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def fit_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(out),
        "--num-workers",
        "0",
        "--batch-size",
        "4",
        "--val-size",
        "6",
        *QUIET,
        *extra,
    ]


@pytest.mark.parametrize("arch", arch_params())
def test_fast_dev_run_every_arch(arch, tiny_folder, tmp_path):
    report = fit_main(fit_args(tiny_folder, tmp_path, "--arch", arch, "--fast-dev-run"))
    assert report["arch"] == arch
    assert 0.0 <= report["test_acc"] <= 1.0
    assert set(report["per_class_acc"]) == {"cat", "dog", "frog"}


def test_fit_writes_checkpoints_logs_and_report(tiny_folder, tmp_path):
    report = fit_main(fit_args(tiny_folder, tmp_path, "--arch", "simple_cnn", "--epochs", "2", "--lr", "0.05"))
    run_dir = tmp_path / "simple_cnn" / "version_0"
    saved = json.loads((run_dir / "test_report.json").read_text())
    assert saved == report
    assert Path(report["checkpoint"]).is_file() and Path(report["checkpoint"]).parent == run_dir / "checkpoints"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    from PIL import Image

    with Image.open(run_dir / "history.png") as img:  # drawn by the default HistoryPlot callback
        assert img.size[0] > 300 and img.size[1] > 200
    assert report["epochs"] == 2 and report["train_images"] == 30 and report["test_images"] == 12
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc/cat", "test/acc/frog", "lr-SGD"):
        assert key in header
    # the per-class values agree with the overall accuracy (equal class sizes in the test set)
    assert abs(sum(report["per_class_acc"].values()) / 3 - report["test_acc"]) < 1e-6


def test_val_size_zero_trains_on_everything_and_keeps_the_last_epoch(tiny_folder, tmp_path):
    # (lr 0.01: at the default 0.1 this tiny run diverges, and a lost loss stops the run)
    report = fit_main(
        fit_args(tiny_folder, tmp_path, "--arch", "simple_cnn", "--epochs", "2", "--val-size", "0", "--lr", "0.01")
    )
    assert report["train_images"] == 36 and report["val_images"] == 0
    # no validation ran, and the tested checkpoint is the last epoch's
    run_dir = tmp_path / "simple_cnn" / "version_0"
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/acc" in header and not any(k.startswith("val/") for k in header)
    assert Path(report["checkpoint"]).name == "epoch001.ckpt"


def test_val_size_zero_with_plateau_scheduler_is_refused(tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(tiny_folder, tmp_path, "--val-size", "0", "--model.scheduler", "plateau"))
    assert exc.value.code == 2
    assert "--val-size 0 turns validation off" in capsys.readouterr().err


def test_checkpoint_round_trip(tiny_folder, tmp_path):
    dm = CIFAR10DataModule(str(tiny_folder), download=False, val_size=6, num_workers=0, batch_size=8, normalize=False)
    model = ClassifierModule(
        arch="resnet18",
        num_classes=dm.num_classes,
        class_names=dm.class_names,
        norm_mean=dm.norm_mean,
        norm_std=dm.norm_std,
        lr=0.01,
    )
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    x = torch.rand(5, 3, 32, 32)
    model.eval()
    before = model.predict_proba(x)
    loaded = ClassifierModule.load_from_checkpoint(path, map_location="cpu").eval()
    torch.testing.assert_close(loaded.predict_proba(x), before, rtol=0, atol=0)
    assert loaded.hparams.arch == "resnet18" and loaded.class_names == ["cat", "dog", "frog"]
    assert tuple(loaded.hparams.norm_mean) == (0.0, 0.0, 0.0)
    # everything needed to rebuild is plain data: loadable without unpickling code
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["class_names"] == ["cat", "dog", "frog"]


@pytest.mark.data
def test_short_real_run_beats_chance(real_subset, tmp_path):
    # 500 real training images (50 per class), 4 epochs: well above the 10% of guessing.
    report = fit_main(
        fit_args(
            real_subset,
            tmp_path,
            "--arch",
            "simple_cnn",
            "--epochs",
            "4",
            "--optimizer",
            "adam",
            "--lr",
            "0.002",
            "--scheduler",
            "none",
            "--val-size",
            "100",
            "--batch-size",
            "32",
        )
    )
    assert report["train_images"] == 500 and report["test_images"] == 200
    assert report["test_acc"] >= 0.18, report


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fit.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    # 5 test images per class (15 in all): two ranks with batch 4 would see a padded, repeated
    # sample under Lightning's default sampler; the metrics must equal a single-process test.
    data = write_image_folder(tmp_path / "data", n_train=10, n_test=5)
    out = tmp_path / "runs"
    proc = run_script(
        *fit_args(
            data, out, "--arch", "simple_cnn", "--epochs", "1", "--devices", "2", "--accelerator", "cpu", "--lr", "0.05"
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = list(out.rglob("test_report.json"))
    assert len(reports) == 1  # only rank 0 writes
    report = json.loads(reports[0].read_text())
    assert report["devices"] == 2 and report["test_images"] == 15

    dm = CIFAR10DataModule(str(data), download=False, val_size=6, num_workers=0, batch_size=4)
    model = ClassifierModule.load_from_checkpoint(report["checkpoint"], map_location="cpu")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    (single,) = trainer.test(model, datamodule=dm, verbose=False)
    assert single["test/acc"] == pytest.approx(report["test_acc"], abs=1e-6)
    assert single["test/loss"] == pytest.approx(report["test_loss"], rel=1e-5)


def test_aliases_map_onto_cli_arguments():
    args = expand_aliases(["--arch", "vgg11", "--epochs=3", "--no-download", "--output-dir", "x", "--model.lr", "1"])
    assert args == [
        "--model.arch=vgg11",
        "--trainer.max_epochs=3",
        "--data.download=false",
        "--trainer.default_root_dir=x",
        "--model.lr",
        "1",
        # the default CSV logger follows --output-dir and is named after the architecture
        "--trainer.logger.init_args.save_dir=x",
        "--trainer.logger.init_args.name=vgg11",
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--arch", "resnet9000"], "unknown architecture 'resnet9000'. Valid names: .*resnet18"),
        (["--epochs", "0"], "number of epochs must be positive, got 0"),
        (["--batch-size", "0"], "batch_size must be positive, got 0"),
        (["--lr", "-1"], "learning rate must be positive"),
    ],
    ids=["arch", "epochs", "batch-size", "lr"],
)
def test_bad_arguments_exit_2_with_message(tiny_folder, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(tiny_folder, tmp_path, *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize("layout", ["missing", "classes-differ", "empty-class"])
def test_bad_data_dir_exit_2_with_message(tmp_path, capsys, layout):
    root = tmp_path / "data"
    if layout != "missing":
        write_image_folder(root)
    if layout == "classes-differ":
        (root / "test" / "dog").rename(root / "test" / "horse")
    if layout == "empty-class":
        for p in (root / "train" / "dog").iterdir():
            p.unlink()
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(root, tmp_path / "runs", "--no-download"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    expected = {
        "missing": f"no CIFAR-10 data at {root}",
        "classes-differ": "only in train: ['dog']; only in test: ['horse']",
        "empty-class": f"the class folder {root / 'train' / 'dog'} holds no images",
    }[layout]
    assert expected in err


def test_user_error_in_a_real_process_has_no_traceback(tiny_folder):
    proc = run_script("--arch", "nonexistent", "--data-dir", str(tiny_folder), "--no-download")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: unknown architecture 'nonexistent'")


def test_resume_deterministic_and_num_nodes_aliases():
    assert expand_aliases(["--resume"]) == ["--ckpt_path=last"]
    assert expand_aliases(["--resume", "--epochs", "3"]) == ["--ckpt_path=last", "--trainer.max_epochs=3"]
    assert expand_aliases(["--resume", "runs/x/version_2", "--deterministic", "--num-nodes", "2"]) == [
        "--ckpt_path=runs/x/version_2",
        "--trainer.deterministic=true",
        "--trainer.num_nodes=2",
    ]
    assert expand_aliases(["--resume=a.ckpt"]) == ["--ckpt_path=a.ckpt"]
