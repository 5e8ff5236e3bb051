"""What a run prints: one plain line per epoch when the output is not a terminal, none of the
library noise, flags named as the user typed them; recipes by name; validation sizes as fractions."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest

from cifar_lightning.fit import fit_main, in_fit_terms
from cifar_lightning.data import CIFAR10DataModule, val_count
from cifar_lightning.errors import UserError
from cifar_lightning.callbacks.progress import EpochLines, QuietRichProgressBar, format_seconds, progress_callback
from cifar_lightning.tools.reproduce import resolve_recipe
from conftest import REPO, write_image_folder

#: Lines that say nothing about the run, each traced to where it came from and removed there.
NOISE = (
    "Tip: For seamless cloud logging",  # Lightning's litlogger advertisement
    "to estimate number of stepping batches",  # Lightning's note on sizing the LR schedule
    "Skipping setting a default `ModelSummary` callback",  # our summary callback next to Lightning's
    "LeafSpec",  # torch 2.14 deprecation triggered inside Lightning's batch flattening
    "`weights_only` was not set",  # our last.ckpt save without an explicit weights_only
    "v_num",  # the logger version in the progress bar
)

CLASSES = tuple(f"c{i}" for i in range(10))


@pytest.fixture(scope="module")
def folder_200(tmp_path_factory) -> Path:
    """10 classes x 20 training images = 200 (and 4 test images each)."""
    return write_image_folder(tmp_path_factory.mktemp("f200") / "data", classes=CLASSES, n_train=20, n_test=4)


def test_fit_into_a_file_prints_one_plain_line_per_epoch_and_no_noise(folder_200, tmp_path):
    # Also: 200 training images work without --val-size (the default is a 10% fraction).
    log = tmp_path / "fit.log"
    cmd = [sys.executable, str(REPO / "scripts" / "fit.py"), "--arch", "resnet20", "--epochs", "3",
           "--data-dir", str(folder_200), "--output-dir", str(tmp_path / "runs"), "--num-workers", "0",
           "--batch-size", "32"]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    for noise in NOISE:
        assert noise not in text, noise
    assert "\r" not in text and "\x1b[" not in text  # no carriage returns, no colour codes
    lines = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3, text[-3000:]
    pattern = (
        r"epoch (\d)/3  train loss \d+\.\d{4} acc \d+\.\d\d%  val loss \d+\.\d{4} acc \d+\.\d\d%  "
        r"lr [\d.e-]+  \d+\.\d s  eta \d+:\d\d"
    )
    assert [int(re.fullmatch(pattern, line).group(1)) for line in lines] == [1, 2, 3], lines
    assert lines[-1].endswith("eta 0:00")
    assert '"val_images": 20' in next((tmp_path / "runs").rglob("test_report.json")).read_text()


def test_progress_display_follows_the_stream():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_callback(Terminal()), QuietRichProgressBar)
    assert isinstance(progress_callback(io.StringIO()), EpochLines)


def test_rich_bar_shows_no_version_number(tiny_folder, tmp_path):
    bar = QuietRichProgressBar()
    dm = CIFAR10DataModule(data_dir=str(tiny_folder), num_workers=0, batch_size=8, val_size=6)
    from cifar_lightning.module import ClassifierModule

    model = ClassifierModule(arch="simple_cnn", num_classes=3, class_names=["cat", "dog", "frog"], lr=0.01)
    logger = pl.loggers.CSVLogger(tmp_path, name="r", version=0)
    trainer = pl.Trainer(max_epochs=1, callbacks=[bar], logger=logger, enable_model_summary=False,
                         limit_train_batches=1, limit_val_batches=1)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    items = bar.get_metrics(trainer, model)
    assert "v_num" not in items and "train/acc" in items


def test_epoch_lines_estimate_the_time_left(tiny_folder, tmp_path):
    out = io.StringIO()
    dm = CIFAR10DataModule(data_dir=str(tiny_folder), num_workers=0, batch_size=8, val_size=6)
    from cifar_lightning.module import ClassifierModule

    model = ClassifierModule(
        arch="simple_cnn", num_classes=3, class_names=["cat", "dog", "frog"], lr=0.01, scheduler="none"
    )
    trainer = pl.Trainer(max_epochs=4, callbacks=[EpochLines(out)], logger=False, enable_model_summary=False,
                         enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("val loss" in line and "  lr 0.01  " in line for line in lines), lines
    assert lines[0].rsplit("eta ", 1)[1] != "" and lines[-1].endswith("eta 0:00")
    assert format_seconds(75.3) == "1:15" and format_seconds(3725) == "1:02:05"


@pytest.mark.parametrize(
    ("val_size", "n", "expected"),
    [(0.1, 50_000, 5000), (5000, 50_000, 5000), (0, 200, 0), (0.1, 200, 20), (0.001, 200, 1), (1, 10, 1)],
)
def test_val_size_is_a_count_or_a_fraction(val_size, n, expected):
    assert val_count(val_size, n) == expected


@pytest.mark.parametrize("val_size", [-1, 1.5, 5000.5])
def test_val_size_that_is_neither_is_refused(val_size):
    with pytest.raises(UserError, match="a number of images .* or a fraction"):
        CIFAR10DataModule(data_dir="unused", download=False, val_size=val_size)


def test_errors_name_the_flag_the_user_typed(folder_200, tmp_path, capsys):
    args = ["--arch", "simple_cnn", "--data-dir", str(folder_200), "--output-dir", str(tmp_path),
            "--num-workers", "0", "--val-size", "200", "--epochs", "1"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        fit_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--val-size 200 holds out 200 images" in err and "--data.val_size" not in err
    assert in_fit_terms("Lower --data.val_size; --trainer.max_epochs_x stays") == (
        "Lower --val-size; --trainer.max_epochs_x stays"
    )


def test_recipes_are_found_by_name(tmp_path):
    configs = REPO / "configs"
    assert resolve_recipe(Path("mynet_tutorial"), configs) == configs / "mynet_tutorial.yaml"
    assert resolve_recipe(Path("mynet_tutorial.yaml"), configs) == configs / "mynet_tutorial.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("model:\n  arch: lenet5\n")
    assert resolve_recipe(own, configs) == own
    with pytest.raises(UserError, match=r"no recipe 'mynet_tutorail'.*mynet_tutorial"):
        resolve_recipe(Path("mynet_tutorail"), configs)
