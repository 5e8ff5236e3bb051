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
from conftest import REPO, write_image_folder

from benchmarks.reproduce import resolve_recipe
from cifar_lightning.callbacks.progress import EpochLines, QuietRichProgressBar, format_seconds, progress_callback
from cifar_lightning.data import CIFAR10DataModule, val_count
from cifar_lightning.errors import UserError
from cifar_lightning.fit import fit_main, in_fit_terms

#: Lines that say nothing about the run, each traced to where it came from and removed there.
NOISE = (
    "Tip: For seamless cloud logging",  # Lightning's litlogger advertisement
    "to estimate number of stepping batches",  # Lightning's note on sizing the LR schedule
    "Skipping setting a default `ModelSummary` callback",  # our summary callback next to Lightning's
    "LeafSpec",  # torch 2.14 deprecation triggered inside Lightning's batch flattening
    "`weights_only` was not set",  # our last.ckpt save without an explicit weights_only
    "v_num",  # the logger version in the progress bar
    "smaller than the logging interval",  # Lightning's note on step logging; ours is per epoch
    "not resumable",  # the tensor loader resumes mid-epoch
)

CLASSES = tuple(f"c{i}" for i in range(10))


@pytest.fixture(scope="module")
def folder_200(tmp_path_factory) -> Path:
    """10 classes x 20 training images = 200 (and 4 test images each)."""
    return write_image_folder(tmp_path_factory.mktemp("f200") / "data", classes=CLASSES, n_train=20, n_test=4)


def test_fit_into_a_file_prints_one_plain_line_per_epoch_and_no_noise(folder_200, tmp_path):
    # Also: 200 training images work without --val-size (the default is a 10% fraction).
    log = tmp_path / "fit.log"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "fit.py"),
        "--arch",
        "resnet20",
        "--epochs",
        "3",
        "--data-dir",
        str(folder_200),
        "--output-dir",
        str(tmp_path / "runs"),
        "--num-workers",
        "0",
        "--batch-size",
        "32",
    ]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    for noise in NOISE:
        assert noise not in text, noise
    assert "\r" not in text and "\x1b[" not in text  # no carriage returns, no colour codes
    lines = [line for line in text.splitlines() if line.startswith("epoch ") and "val loss" in line]
    assert len(lines) == 3, text[-3000:]
    pattern = (
        r"epoch (\d)/3  train loss \d+\.\d{4} acc \d+\.\d\d%  val loss \d+\.\d{4} acc \d+\.\d\d%  "
        r"lr [\d.e-]+  \d+\.\d s  eta \d+:\d\d"
    )
    assert [int(re.fullmatch(pattern, line).group(1)) for line in lines] == [1, 2, 3], lines
    assert lines[-1].endswith("eta 0:00")
    # the first line says where the run writes, on what, in which precision, and how long an epoch is
    run = tmp_path / "runs" / "resnet20" / "version_0"
    assert re.search(
        rf"^run {re.escape(str(run))}  cpu \(\d+ threads\)  precision 32-true \(auto: [^)]*\)  6 batches an epoch, 3 epochs$",
        text,
        re.M,
    ), text[:3000]
    assert re.search(
        r"^first estimate: \d+\.\d\d s a batch over batches 2-4, about \d+:\d\d for the rest of the fit$", text, re.M
    )
    # within each epoch, lines with the batch, the running metrics, the pace and the time left
    within = [line for line in text.splitlines() if re.match(r"epoch \d/3  batch ", line)]
    batch = r"epoch (\d)/3  batch (\d)/6 \(\d+%\)  train loss \d+\.\d{4} acc \d+\.\d\d%  [\d,]+ images/s"
    assert within and all(re.match(batch, line) for line in within), within
    assert any(re.search(r"epoch left \d+:\d\d  run left \d+:\d\d$", line) for line in within), within
    assert {int(re.match(batch, line).group(1)) for line in within} == {1, 2, 3}
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
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[bar],
        logger=logger,
        enable_model_summary=False,
        limit_train_batches=1,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=dm)
    items = bar.get_metrics(trainer, model)
    assert "v_num" not in items and "train/acc" in items


def _run_in_terminal(cmd: list[str], cols: int, rows: int, timeout: float = 300) -> tuple[int, bytes]:
    """Run ``cmd`` with a pseudo-terminal of ``cols`` x ``rows`` as its input and output, as from a
    user's shell; returns its exit code and every byte it wrote to the terminal."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM", "COLUMNS", "LINES")}
    env |= {"TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, close_fds=True)
    os.close(slave)
    raw, deadline = bytearray(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            raw += chunk
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    os.close(master)
    return proc.wait(timeout=30), bytes(raw)


def test_a_fit_in_a_terminal_shows_the_running_loss_and_one_final_bar(tiny_folder, tmp_path):
    import pyte

    cols = 200  # wide enough that no line wraps
    code, raw = _run_in_terminal(
        [
            sys.executable,
            str(REPO / "scripts" / "fit.py"),
            "--arch",
            "simple_cnn",
            "--epochs",
            "2",
            "--data-dir",
            str(tiny_folder),
            "--output-dir",
            str(tmp_path / "runs"),
            "--num-workers",
            "0",
            "--batch-size",
            "4",
            "--val-size",
            "6",
        ],
        cols,
        50,
    )
    text = raw.decode(errors="replace")
    assert code == 0, text[-3000:]
    # Every frame rich drew, colours and cursor moves removed.
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n").splitlines()
    # The loss shows while the first epoch runs, before any epoch has ended (Lightning alone shows
    # the previous epoch's means, so nothing in the first).
    during = [f for f in frames if (m := re.match(r"Epoch 1/2 .* (\d+)/(\d+) ", f)) and 0 < int(m[1]) < int(m[2])]
    assert any(re.search(r"train/loss: \d+\.\d{3} train/acc: \d\.\d{3}", f) for f in during), during[:3]
    assert not any(f.startswith("Epoch 0") for f in frames)  # epochs count from 1
    assert "`Trainer.fit` stopped" not in text  # never written into the bar's line

    screen = pyte.Screen(cols, 400)  # taller than the output: nothing scrolls away
    pyte.ByteStream(screen).feed(raw)
    lines = [line.rstrip() for line in screen.display]
    bars = [line for line in lines if line.startswith("Epoch ")]
    assert len(bars) == 1 and bars[0].startswith("Epoch 2/2 ") and "val/acc:" in bars[0], bars  # one final bar
    assert "Test results: simple_cnn on 12 test images" in lines  # the report's title on one line


def test_the_bar_reads_the_running_metrics_at_its_own_pace_not_per_step(tiny_folder, tmp_path):
    from cifar_lightning.module import ClassifierModule

    # Batches of two images (one would leave BatchNorm a single value per channel, and the loss NaN).
    model = ClassifierModule(arch="simple_cnn", num_classes=3, class_names=["cat", "dog", "frog"], lr=0.01)
    reads = []
    read = model.running_metrics
    model.running_metrics = lambda stage="train": reads.append(stage) or read(stage)
    dm = CIFAR10DataModule(data_dir=str(tiny_folder), num_workers=0, batch_size=2, val_size=6)
    # A read period longer than the fit: the bar reads after each epoch's first step and at its
    # end, and never per step, however fast or slow the steps are.
    bar = QuietRichProgressBar(read_every=3600)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[bar],
        logger=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 30 and len(reads) == 2 * trainer.max_epochs, len(reads)
    # The last read, at the epoch's end, is the epoch's mean, as logged.
    for key in ("train/loss", "train/acc"):
        assert bar.get_metrics(trainer, model)[key] == pytest.approx(float(trainer.callback_metrics[key]), rel=1e-5)


def test_the_bar_redraws_a_few_times_a_second_not_per_batch(tiny_folder, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar

    from cifar_lightning.module import ClassifierModule

    drawn = []
    original = RichProgressBar.on_train_batch_end
    monkeypatch.setattr(
        RichProgressBar,
        "on_train_batch_end",
        lambda self, trainer, *a: drawn.append((trainer.current_epoch, a[-1])) or original(self, trainer, *a),
    )
    for every, expected in ((3600, [(0, 0), (0, 14), (1, 14)]), (0, [(e, b) for e in (0, 1) for b in range(15)])):
        drawn.clear()
        model = ClassifierModule(arch="simple_cnn", num_classes=3, class_names=["cat", "dog", "frog"], lr=0.01)
        dm = CIFAR10DataModule(data_dir=str(tiny_folder), num_workers=0, batch_size=2, val_size=6)  # 15 batches
        trainer = pl.Trainer(
            max_epochs=2,
            callbacks=[QuietRichProgressBar(redraw_every=every)],
            logger=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=1,
        )
        trainer.fit(model, datamodule=dm)
        assert drawn == expected  # the first batch, then each epoch's last: never a stale final bar


def test_epoch_lines_estimate_the_time_left(tiny_folder, tmp_path):
    out = io.StringIO()
    dm = CIFAR10DataModule(data_dir=str(tiny_folder), num_workers=0, batch_size=8, val_size=6)
    from cifar_lightning.module import ClassifierModule

    model = ClassifierModule(
        arch="simple_cnn", num_classes=3, class_names=["cat", "dog", "frog"], lr=0.01, scheduler="none"
    )
    trainer = pl.Trainer(
        max_epochs=4, callbacks=[EpochLines(out)], logger=False, enable_model_summary=False, enable_checkpointing=False
    )
    trainer.fit(model, datamodule=dm)
    lines = [line for line in out.getvalue().splitlines() if "val loss" in line]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("val loss" in line and "  lr 0.01  " in line for line in lines), lines
    # The estimate of the time left is a duration, and it only shrinks as the epochs pass.
    etas = [re.fullmatch(r"(?:(\d+):)?(\d+):(\d\d)", line.rsplit("eta ", 1)[1]) for line in lines]
    assert all(etas), lines
    left = [int(m[1] or 0) * 3600 + int(m[2]) * 60 + int(m[3]) for m in etas]
    assert left == sorted(left, reverse=True) and left[-1] == 0, lines
    assert format_seconds(75.3) == "1:15" and format_seconds(3725) == "1:02:05"


def test_a_log_gets_a_line_at_every_tenth_of_an_epoch_or_every_minute(tiny_folder, monkeypatch):
    from cifar_lightning.callbacks import progress
    from cifar_lightning.module import ClassifierModule

    def fit(lines: EpochLines) -> list[str]:
        model = ClassifierModule(arch="simple_cnn", num_classes=3, class_names=["cat", "dog", "frog"], lr=0.01)
        # 30 training images in batches of 2 (one would leave BatchNorm one value a channel): 15 batches
        dm = CIFAR10DataModule(data_dir=str(tiny_folder), num_workers=0, batch_size=2, val_size=6)
        trainer = pl.Trainer(
            max_epochs=1,
            callbacks=[lines],
            logger=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=1,
        )
        trainer.fit(model, datamodule=dm)
        return [line for line in lines._stream.getvalue().splitlines() if "  batch " in line]

    tenths = fit(EpochLines(io.StringIO(), every=3600))
    # 15 batches: the tenths fall after batches 2, 3, 5, 6, 8, 9, 11, 12 and 14, never after the last
    assert [int(re.search(r"batch (\d+)/15", line).group(1)) for line in tenths] == [2, 3, 5, 6, 8, 9, 11, 12, 14]
    # a slow epoch: a line once a minute has passed, whatever the tenths say
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    ticking = EpochLines(io.StringIO(), every=60)
    original = ticking.on_train_batch_end

    def slow_batch(*args, **kwargs):
        now[0] += 25.0  # 25 s a batch: a minute passes every third batch
        original(*args, **kwargs)

    monkeypatch.setattr(ticking, "on_train_batch_end", slow_batch)
    minutes = [int(re.search(r"batch (\d+)/15", line).group(1)) for line in fit(ticking)]
    assert {3, 6, 9, 12} <= set(minutes) and 1 not in minutes, minutes


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
    args = [
        "--arch",
        "simple_cnn",
        "--data-dir",
        str(folder_200),
        "--output-dir",
        str(tmp_path),
        "--num-workers",
        "0",
        "--val-size",
        "200",
        "--epochs",
        "1",
    ]
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
