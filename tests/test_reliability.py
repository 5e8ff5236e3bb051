"""Reliable runs: resume after a crash or a signal, atomic checkpoints, DDP, determinism, bad input."""

from __future__ import annotations

import csv
import errno
import gc
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import REPO
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback
from PIL import Image

from benchmarks import child_env
from cifar_lightning.callbacks import RandomState
from cifar_lightning.checkpoint import AtomicCheckpointIO, CheckpointWriteError
from cifar_lightning.cli import cli_main
from cifar_lightning.fit import fit_main
from cifar_lightning.module import ClassifierModule

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def write_noise_folder(root: Path, n_train: int = 20, n_test: int = 4, classes=("cat", "dog", "frog")) -> Path:
    """Images of pure noise. Nothing is learnt, so the loss moves with every weight update: two
    runs that log the same numbers took the same steps on the same batches."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def fit_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data-dir",
        str(data),
        "--output-dir",
        str(out),
        "--num-workers",
        "0",
        "--batch-size",
        "4",
        "--val-size",
        "6",
        "--arch",
        "simple_cnn",
        "--lr",
        "0.01",
        *QUIET,
        *extra,
    ]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def epochs_logged(rows: list[dict[str, str]], key: str) -> list[int]:
    return [int(r["epoch"]) for r in rows if r.get(key)]


def user_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, last.ckpt) of a one-epoch simple_cnn run on 3 x 10 noise images."""
    root = tmp_path_factory.mktemp("trained")
    data = write_noise_folder(root / "data", n_train=10, n_test=5)
    report = fit_main(fit_args(data, root / "runs", "--epochs", "1"))
    return data, Path(report["last_checkpoint"])


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


#: Random crops and flips, and an epoch-interval LR drop at the resume point: the weights,
#: optimizer, scheduler, loops and RNG must all come back for a resumed run to match.
EXACT = ("--augment", "standard", "--scheduler", "multistep", "--model.milestones", "[1]")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(data, report, metrics.csv) of a 2-epoch run on 3 x 10 noise images: 6 steps per epoch."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = write_noise_folder(root / "data", n_train=10)
    report = fit_main(fit_args(data, root / "runs", "--epochs", "2", *EXACT))
    return data, report, root / "runs" / "simple_cnn" / "version_0" / "metrics.csv"


def test_resumed_run_matches_an_uninterrupted_one(uninterrupted, tmp_path):
    data, whole, whole_log = uninterrupted
    fit_main(fit_args(data, tmp_path, "--epochs", "1", *EXACT))
    resumed = fit_main(fit_args(data, tmp_path, "--epochs", "2", *EXACT, "--resume"))

    run = tmp_path / "simple_cnn" / "version_0"
    assert resumed["report_path"] == str(run / "test_report.json")  # the same run directory
    assert not run.with_name("version_1").exists()
    assert (resumed["epochs"], resumed["global_step"]) == (whole["epochs"], whole["global_step"]) == (2, 12)
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-6)
    assert resumed["test_acc"] == pytest.approx(whole["test_acc"], abs=1e-9)
    assert Path(resumed["checkpoint"]).name == Path(whole["checkpoint"]).name

    def best_score(report) -> float:
        state = torch.load(report["last_checkpoint"], weights_only=True)["callbacks"]
        return next(float(s["best_model_score"]) for k, s in state.items() if k.startswith("ModelCheckpoint"))

    assert best_score(resumed) == pytest.approx(best_score(whole), abs=1e-9)
    # The log reads like the uninterrupted run's: every epoch once, the same values, and no test
    # row left over from the first, 1-epoch run.
    rows = assert_same_log(run / "metrics.csv", whole_log)
    assert epochs_logged(rows, "val/loss") == [0, 1] and epochs_logged(rows, "test/acc") == [2]


def test_stop_during_validation_repeats_that_epoch(uninterrupted, tmp_path, monkeypatch):
    # Lightning would resume a checkpoint taken mid-validation after the validation, leaving that
    # epoch unvalidated and unlogged; the run goes back to the previous epoch's last.ckpt instead.
    import cifar_lightning.cli as cli

    class SigtermInValidation(Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if trainer.current_epoch == 1 and not trainer.sanity_checking:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop at the next check

    data, whole, whole_log = uninterrupted
    args = fit_args(data, tmp_path, "--epochs", "2", *EXACT)
    defaults = cli.default_callbacks
    monkeypatch.setattr(cli, "default_callbacks", lambda config: [*defaults(config), SigtermInValidation()])
    with pytest.raises(SystemExit) as exc:
        fit_main(args)
    assert exc.value.code == 128 + signal.SIGTERM
    monkeypatch.undo()
    run = tmp_path / "simple_cnn" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    resumed = fit_main([*args, "--resume"])
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-6)
    assert_same_log(run / "metrics.csv", whole_log)


class BatchRecorder(Callback):
    """(epoch, batch index, a digest of the images) of every training batch, as the step gets it."""

    def __init__(self, stop_at: tuple[int, int] | None = None) -> None:
        self.seen: list[tuple[int, int, str]] = []
        self.stop_at = stop_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        digest = hashlib.sha256(batch[0].detach().cpu().numpy().tobytes()).hexdigest()[:16]
        self.seen.append((trainer.current_epoch, batch_idx, digest))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop at the next check


def test_a_run_stopped_mid_epoch_resumes_with_the_batches_it_would_have_had(uninterrupted, tmp_path, monkeypatch):
    import warnings

    import cifar_lightning.cli as cli

    data, whole, _ = uninterrupted
    # random crops and flips (EXACT), and cutout: every draw of the rest of the epoch must come back
    args = fit_args(data, tmp_path, "--epochs", "2", *EXACT, "--cutout", "8")
    defaults = cli.default_callbacks
    records = [BatchRecorder(), BatchRecorder(stop_at=(0, 2)), BatchRecorder()]
    for i, (extra, out) in enumerate(
        (([], tmp_path / "whole"), ([], tmp_path / "stopped"), (["--resume"], tmp_path / "stopped"))
    ):
        monkeypatch.setattr(cli, "default_callbacks", lambda config, r=records[i]: [*defaults(config), r])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                report = fit_main([*args, "--output-dir", str(out), *extra])
            except SystemExit as exc:
                assert i == 1 and exc.code == 128 + signal.SIGTERM
        assert not [w for w in caught if "not resumable" in str(w.message)]  # it resumes exactly
        assert not [w for w in caught if "exists and is not empty" in str(w.message)]  # its own folder again
        if i == 0:
            whole = report
    resumed = report
    assert [r[:2] for r in records[1].seen] == [(0, 0), (0, 1), (0, 2)]
    assert records[0].seen[3:] == records[2].seen  # the same batches, in the same order, as never stopped
    assert resumed["global_step"] == whole["global_step"] == 12
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-6)


def test_the_tensor_loader_resumes_at_the_batch_after_the_last_one_taken():
    from cifar_lightning.data.tensor_loader import TensorLoader

    images = torch.randint(0, 256, (50, 8, 8, 3), dtype=torch.uint8)
    make = lambda: TensorLoader(
        images, torch.arange(50), torch.arange(50), 8, train=True, augment="trivialaugment", cutout=3, seed=5
    )
    whole = [x for x, _ in make()]
    first = make()
    it = iter(first)
    for _ in range(3):
        next(it)
        first.batch_taken()
    next(it)  # prefetched by the loop, never trained on: not counted
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches"] == 3
    second = make()
    second.load_state_dict(state)
    rest = [x for x, _ in second]
    assert len(rest) == len(whole) - 3 and all(torch.equal(a, b) for a, b in zip(rest, whole[3:]))
    # the next epoch is whole again
    assert len([x for x, _ in second]) == len(whole)


def assert_same_log(path: Path, reference: Path) -> list[dict[str, str]]:
    """The two metrics.csv files hold the same rows, with values equal up to float noise."""
    rows, expected = read_rows(path), read_rows(reference)
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys()
        for key in want:
            # An empty cell (a metric not logged at that step) must stay empty; numbers match to float noise.
            assert bool(row[key]) == bool(want[key]), (key, row)
            if want[key]:
                assert float(row[key]) == pytest.approx(float(want[key]), rel=1e-6), (key, row)
    return rows


def test_cli_fit_ckpt_path_last_continues_the_latest_run(tmp_path):
    data = write_noise_folder(tmp_path / "data", n_train=8)
    args = [
        "fit",
        "--model.arch=simple_cnn",
        f"--data.data_dir={data}",
        "--data.download=false",
        "--data.num_workers=0",
        "--data.batch_size=6",
        "--data.val_size=6",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        *QUIET,
    ]
    cli_main([*args, "--trainer.max_epochs=1"])
    cli = cli_main([*args, "--trainer.max_epochs=2", "--ckpt_path=last"])
    run = tmp_path / "simple_cnn" / "version_0"  # named as fit.py names its runs
    assert cli.trainer.current_epoch == 2 and Path(cli.trainer.log_dir) == run
    assert epochs_logged(read_rows(run / "metrics.csv"), "val/acc") == [0, 1]


def test_resume_without_a_checkpoint_says_where_it_looked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(tmp_path / "data", tmp_path / "runs", "--resume"))
    assert exc.value.code == 2
    looked = tmp_path / "runs" / "simple_cnn" / "version_*" / "checkpoints" / "last.ckpt"
    assert user_error(capsys) == (
        f"error: no checkpoint to resume: nothing matches {looked}. Start the run without --resume, "
        "or pass --resume PATH with a run directory or a .ckpt file."
    )


@pytest.mark.parametrize("damage", ["truncated", "random-bytes"])
@pytest.mark.parametrize("entry", ["fit.py", "cli"])
def test_corrupt_checkpoint_is_one_error_naming_the_file(tmp_path, capsys, damage, entry):
    path = tmp_path / "runs" / "simple_cnn" / "version_0" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {"arch": "simple_cnn"}}, path)
    data = path.read_bytes()
    # fixed junk, not os.urandom: random bytes sometimes start like a zip or a pickle
    junk = (b"not a checkpoint at all \x00\xff" * len(data))[: len(data)]
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else junk)
    with pytest.raises(SystemExit) as exc:
        if entry == "fit.py":
            fit_main(fit_args(tmp_path / "data", tmp_path / "runs", "--resume"))
        else:
            cli_main(["fit", f"--ckpt_path={path}", f"--data.data_dir={tmp_path}"])
    assert exc.value.code == 2
    kind = "truncated or corrupt" if damage == "truncated" else "not a PyTorch checkpoint"
    assert user_error(capsys).startswith(f"error: checkpoint {path} is {kind}")


def test_resume_into_another_architecture_is_refused(trained_run, tmp_path, capsys):
    data, ckpt = trained_run
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(data, tmp_path, "--arch", "lenet5", "--resume", str(ckpt.parent.parent)))
    assert exc.value.code == 2
    assert user_error(capsys).startswith(
        f"error: cannot resume from {ckpt}: the checkpoint has arch='simple_cnn', but this run builds arch='lenet5'."
    )


def test_resume_of_a_run_normalised_otherwise_is_refused(trained_run, tmp_path, capsys):
    """A run made before image folders got their own statistics normalised with CIFAR-10's: resumed
    now, it would train on other inputs without a word. It is refused, naming the way to resume."""
    from cifar_lightning.constants import CIFAR10_MEAN

    data, ckpt = trained_run
    old = torch.load(ckpt, weights_only=False, map_location="cpu")
    old["hyper_parameters"]["norm_mean"] = CIFAR10_MEAN
    old["hyper_parameters"].pop("image_size", None)  # older checkpoints lack it: 32 is what they ran at
    older = tmp_path / "older.ckpt"
    torch.save(old, older)
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(data, tmp_path, "--resume", str(older)))
    assert exc.value.code == 2
    message = user_error(capsys)
    assert f"cannot resume from {older}: the checkpoint has norm_mean=(0.4914, 0.4822, 0.4465)" in message
    assert "--data.mean [0.4914, 0.4822, 0.4465] --data.std" in message and "give the checkpoint's" in message


def test_a_checkpoint_from_before_image_size_resumes_as_32_pixels():
    from cifar_lightning.checkpoint import check_resumable
    from cifar_lightning.errors import UserError

    stored = {
        "arch": "simple_cnn",
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "norm_mean": [0.5] * 3,
        "norm_std": [0.25] * 3,
    }
    check_resumable(stored, "old.ckpt", {**stored, "norm_mean": (0.5,) * 3, "norm_std": (0.25,) * 3, "image_size": 32})
    with pytest.raises(UserError, match="the checkpoint has image_size=32, but this run builds image_size=40"):
        check_resumable(stored, "old.ckpt", {**stored, "image_size": 40})


def _stop_with(sig: int, args: list[str], written: Callable[[], bool], stderr_path: Path) -> int:
    """Start scripts/fit.py, send ``sig`` as soon as ``written()`` says so; the exit code.
    Standard output and error both go to ``stderr_path``."""
    with open(stderr_path, "w") as stderr:
        command = [sys.executable, str(REPO / "scripts" / "fit.py"), *args]
        proc = subprocess.Popen(command, stdout=stderr, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.monotonic() + 300
            while not written():
                assert proc.poll() is None and time.monotonic() < deadline, stderr_path.read_text()[-3000:]
                time.sleep(0.01)
            proc.send_signal(sig)
            return proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_signals_mid_epoch_checkpoint_and_the_run_resumes(tmp_path):
    # SIGTERM during the second epoch; resumed, then Ctrl-C (SIGINT) during the third; resumed to the end.
    data = write_noise_folder(tmp_path / "data", n_train=12)
    steps = (3 * 12 - 6) // 2  # training batches per epoch
    args = fit_args(data, tmp_path / "runs", "--epochs", "3", "--batch-size", "2")
    run = tmp_path / "runs" / "simple_cnn" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    resume_hint = f"--lr 0.01 {' '.join(QUIET)} --epochs 3 --batch-size 2 --resume {run}"

    for sig, resume, epoch in ((signal.SIGTERM, [], 1), (signal.SIGINT, ["--resume"], 2)):
        # Every write of last.ckpt is a new file (written beside it, then renamed over it).
        old = last.stat().st_ino if last.exists() else None
        code = _stop_with(sig, [*args, *resume], lambda: last.exists() and last.stat().st_ino != old, tmp_path / "err")
        stderr = (tmp_path / "err").read_text()
        assert code == 128 + sig, stderr[-3000:]
        hints = [line for line in stderr.splitlines() if line.startswith("interrupted by")]
        assert len(hints) == 1
        assert hints[0].startswith(f"interrupted by {signal.Signals(sig).name} at epoch {epoch + 1}, step ")  # from 1
        assert hints[0].endswith(resume_hint)
        if sig == signal.SIGINT:  # Lightning's SIGTERM handler does the stop; its note would misname Ctrl-C
            assert "Received SIGTERM" not in stderr
        stopped = torch.load(last, weights_only=True)
        assert epoch * steps <= stopped["global_step"] < (epoch + 1) * steps  # written during that epoch
        before = read_rows(run / "metrics.csv")
        assert epochs_logged(before, "val/loss") == list(range(epoch))

    report = fit_main([*args, "--resume"])
    assert report["epochs"] == 3 and report["global_step"] == 3 * steps
    rows = read_rows(run / "metrics.csv")
    assert [{k: r[k] for k in before[0]} for r in rows[: len(before)]] == before  # kept as they were
    assert epochs_logged(rows, "val/loss") == [0, 1, 2] and epochs_logged(rows, "train/loss") == [0, 1, 2]
    logged_steps = [int(r["step"]) for r in rows if r["val/loss"]]
    assert logged_steps == [steps - 1, 2 * steps - 1, 3 * steps - 1]
    assert not run.with_name("version_1").exists()


class MarkMidEpoch(Callback):
    """From batch 10 of epoch 1 on, rank 1 writes a marker file and every rank slows to 0.2 s a
    batch: a signal sent when the marker appears lands in that epoch, however fast the machine."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx >= 10:
            if trainer.global_rank == 1:
                Path(self.marker).write_text(str(os.getpid()))
            time.sleep(0.2)


def _env_with_tests() -> dict[str, str]:
    """The environment of a child process that can import this module's callbacks."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_sigterm_to_one_ddp_rank_stops_every_rank_and_the_run_resumes(tmp_path):
    # A scheduler's SIGTERM may reach one process only. Both ranks must stop after the same batch,
    # within seconds, write last.ckpt once (mid-epoch), and the run must resume from it.
    data = write_noise_folder(tmp_path / "data", n_train=100)
    args = fit_args(
        data, tmp_path / "runs", "--epochs", "3", "--batch-size", "2", "--devices", "2", "--accelerator", "cpu"
    )
    marker = tmp_path / "rank1.pid"
    mark = json.dumps({"class_path": "test_reliability.MarkMidEpoch", "init_args": {"marker": str(marker)}})
    run = tmp_path / "runs" / "simple_cnn" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    steps = -(-(3 * 100 - 6) // 2 // 2)  # per rank and epoch: 294 images, 2 ranks, batch 2
    log = tmp_path / "err"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "fit.py"), *args, f"--trainer.callbacks+={mark}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=_env_with_tests(),
        )
        try:
            deadline = time.monotonic() + 300
            while not marker.exists() or not marker.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.01)
            first = torch.load(last, weights_only=True)["global_step"]  # written at the end of epoch 0
            rank1 = int(marker.read_text())
            os.kill(rank1, signal.SIGTERM)
            sent = time.monotonic()
            code = proc.wait(timeout=60)
            while Path(f"/proc/{rank1}").exists() and time.monotonic() < sent + 30:
                time.sleep(0.05)
            stopped_within = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert stopped_within < 15, stopped_within
    hints = [line for line in text.splitlines() if line.startswith("interrupted by")]
    assert len(hints) == 1 and hints[0].startswith("interrupted by SIGTERM at epoch 2, step "), text[-3000:]
    stopped = torch.load(last, weights_only=True)
    assert first == steps and steps + 10 < stopped["global_step"] < 2 * steps  # written at the stop, mid-epoch
    ClassifierModule.load_from_checkpoint(last, map_location="cpu")

    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fit.py"), *args, "--resume"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "test_report.json").read_text())
    assert report["epochs"] == 3 and report["global_step"] == 3 * steps


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_devices(tmp_path, first, second):
    # A 2-epoch run stopped after its first epoch on `first` CPU processes, resumed on `second`:
    # it ends after the steps of each, and its cosine schedule, resized, ends at zero on the last.
    data = write_noise_folder(tmp_path / "data", n_train=12)  # 30 training images
    args = fit_args(
        data, tmp_path / "runs", "--batch-size", "2", "--accelerator", "cpu", "--scheduler", "cosine", "--epochs", "2"
    )
    steps = {1: 15, 2: 8}  # per epoch: 30 images in batches of 2, on one rank or split over two
    stop = '--trainer.callbacks+={"class_path": "test_reliability.StopAfterFirstEpoch"}'  # a preempted job
    for devices, more in ((first, [stop]), (second, ["--resume"])):
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "fit.py"), *args, "--devices", str(devices), *more],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
            env=_env_with_tests(),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "simple_cnn" / "version_0"
    report = json.loads((run / "test_report.json").read_text())
    assert report["epochs"] == 2 and report["global_step"] == steps[first] + steps[second], report
    assert f"now ends at step {steps[first] + steps[second]}" in proc.stderr
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-6)
    assert not run.with_name("version_1").exists()


# ---------------------------------------------------------------------------------------------
# Atomic checkpoints
# ---------------------------------------------------------------------------------------------


_torch_save = torch.save


def _save_half_then_raise(exc: BaseException):
    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        _torch_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise exc

    return save


@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt()], ids=["disk-full", "killed"]
)
def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, exc):
    ckpt_io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt_io.save_checkpoint({"step": 1, "w": torch.arange(5000.0)}, path)
    monkeypatch.setattr(torch, "save", _save_half_then_raise(exc))
    with pytest.raises(CheckpointWriteError if isinstance(exc, OSError) else KeyboardInterrupt) as err:
        ckpt_io.save_checkpoint({"step": 2, "w": torch.zeros(5000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(path.parent) == ["last.ckpt"]  # the temporary file is gone too
    if isinstance(exc, OSError):
        assert str(err.value) == (
            f"cannot write checkpoint {path}: No space left on device. The previous checkpoint there, "
            "if any, is unchanged. Free some space or pass --output-dir on another disk."
        )


def test_disk_full_during_fit_is_one_error_and_keeps_last_ckpt(tmp_path, monkeypatch, capsys):
    data = write_noise_folder(tmp_path / "data", n_train=8)
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) <= 2:  # the first epoch's best and last checkpoints
            return _torch_save(obj, f, *args, **kwargs)
        return _save_half_then_raise(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))(obj, f)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(data, tmp_path / "runs", "--epochs", "2"))
    monkeypatch.undo()
    assert exc.value.code == 2
    assert re.fullmatch(r"error: cannot write checkpoint \S+\.ckpt: No space left on device\. .*", user_error(capsys))
    last = tmp_path / "runs" / "simple_cnn" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0


# ---------------------------------------------------------------------------------------------
# Distributed correctness and determinism
# ---------------------------------------------------------------------------------------------


def test_ddp_validation_matches_one_process(trained_run, tmp_path):
    # 7 validation images over 2 ranks with batches of 4: a padding sampler would count one twice.
    data, ckpt = trained_run
    args = [
        "validate",
        f"--ckpt_path={ckpt}",
        f"--data.data_dir={data}",
        "--data.download=false",
        "--data.num_workers=0",
        "--data.batch_size=4",
        "--data.val_size=7",
        "--trainer.accelerator=cpu",
        *QUIET,
    ]

    def out(folder: Path) -> list[str]:
        return [f"--trainer.default_root_dir={folder}", f"--trainer.logger.init_args.save_dir={folder}"]

    cli_main([*args, "--trainer.devices=1", *out(tmp_path / "one")])
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_lightning", *args, "--trainer.devices=2", *out(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = list((tmp_path / "two").rglob("metrics.csv"))
    assert len(logs) == 1  # only rank 0 writes
    (one,), (two,) = read_rows(next((tmp_path / "one").rglob("metrics.csv"))), read_rows(logs[0])
    keys = [k for k in one if k.startswith("val/")]
    assert {"val/acc", "val/loss", "val/acc/cat"} <= set(keys)
    for key in keys:
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-5, abs=1e-7), key


DDP_RUNNER = """
import json, sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.module import ClassifierModule

data, out = Path(sys.argv[1]), Path(sys.argv[2])
sample = CIFAR10DataModule.sample_train_images
# Each rank whitens from other images, as ranks on other hardware would compute other filters.
CIFAR10DataModule.sample_train_images = lambda self, n: sample(self, n) * (1 + dist.get_rank())
reductions, seen = [], {}
all_reduce = dist.all_reduce
dist.all_reduce = lambda *a, **k: reductions.append(1) or all_reduce(*a, **k)


class Record(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        init = pl_module.model.init_from_data

        def recorded(images):
            init(images)
            seen["own"] = pl_module.model.whiten.weight.flatten().tolist()

        pl_module.model.init_from_data = recorded

    def on_validation_epoch_start(self, trainer, pl_module):
        reductions.clear()

    def on_validation_end(self, trainer, pl_module):
        seen["reductions"] = len(reductions)


dm = CIFAR10DataModule(str(data), download=False, val_size=8, batch_size=4, num_workers=0)
model = ClassifierModule(arch="fastnet", arch_kwargs={"widths": [8, 8, 8]}, num_classes=3, lr=0.01)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, callbacks=[Record()], default_root_dir=str(out))
trainer.fit(model, datamodule=dm)
seen["whiten"] = model.model.whiten.weight.flatten().tolist()
seen["per_class"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/acc/")}
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))
"""


def test_ddp_ranks_take_rank_zeros_whitening_and_reduce_no_metric_twice(tmp_path):
    # Two CPU processes (gloo). fastnet's whitening is set at the start of the fit, after DDP has
    # broadcast the weights: every rank must then take rank 0's. The per-class accuracies come
    # synchronised from torchmetrics: a validation makes one all-reduce (the images counted), not
    # one more per class.
    data = write_noise_folder(tmp_path / "data", n_train=12, n_test=2)
    runner, out = tmp_path / "runner.py", tmp_path / "out"
    runner.write_text(DDP_RUNNER)
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(runner), str(data), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["own"] != rank1["own"]  # the ranks computed other filters...
    assert rank0["whiten"] == rank1["whiten"] == rank0["own"]  # ...and both train with rank 0's
    assert rank0["reductions"] == rank1["reductions"] == 1
    assert set(rank0["per_class"]) == {"val/acc/cat", "val/acc/dog", "val/acc/frog"}
    assert rank0["per_class"] == rank1["per_class"]


def test_each_ddp_rank_gets_its_own_random_stream():
    def draws(rank: int, world_size: int) -> torch.Tensor:
        torch.manual_seed(0)
        RandomState().on_fit_start(SimpleNamespace(world_size=world_size, global_rank=rank), None)
        return torch.rand(8)

    torch.manual_seed(0)
    seeded = torch.rand(8)
    assert torch.equal(draws(0, 1), seeded)  # a single process keeps its seeded stream
    rank0, rank1 = draws(0, 2), draws(1, 2)
    assert not torch.equal(rank0, rank1)  # augmentation differs between ranks...
    assert torch.equal(rank0, draws(0, 2)) and torch.equal(rank1, draws(1, 2))  # ...and follows the seed


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = RandomState().state_dict()
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.save({"callbacks": {"RandomState": state}}, tmp_path / "x.ckpt")
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    RandomState().load_state_dict(torch.load(tmp_path / "x.ckpt", weights_only=True)["callbacks"]["RandomState"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_deterministic_runs_are_bit_identical(tmp_path):
    data = write_noise_folder(tmp_path / "data", n_train=6)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        for out in ("a", "b"):
            fit_main(fit_args(data, tmp_path / out, "--epochs", "2", "--seed", "7", "--deterministic"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
    a, b = (tmp_path / out / "simple_cnn" / "version_0" / "metrics.csv" for out in ("a", "b"))
    assert a.read_text() == b.read_text()  # the log has no time column


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, valid",
    [
        ("--optimizer", "sgdd", ["sgd, adam, adamw, muon, sam"]),
        ("--scheduler", "cosin", ["none, multistep, cosine, linear, onecycle, plateau"]),
        ("--precision", "17", ["16-mixed", "bf16-mixed", "32-true", "auto"]),
    ],
    ids=["optimizer", "scheduler", "precision"],
)
def test_unknown_choice_lists_the_valid_ones(tmp_path, capsys, flag, value, valid):
    # One line: the flag, the valid values in plain words, the value given.
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(tmp_path, tmp_path, flag, value))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {flag}: expected one of "), err
    assert all(v in err for v in valid), err
    assert f"got '{value}'" in err and "typing." not in err and "Literal" not in err, err


@pytest.mark.parametrize("case", ["gpu", "cpu-cores"])
def test_devices_that_do_not_exist(tmp_path, capsys, case):
    cores = os.cpu_count()
    if case == "gpu":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        extra, message = ["--accelerator", "gpu"], "error: --accelerator gpu asks for a GPU, but PyTorch sees none"
    else:
        extra = ["--accelerator", "cpu", "--devices", str(cores + 1)]
        message = f"error: --devices {cores + 1} asks for {cores + 1} CPU processes, but this machine has {cores} CPU"
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(tmp_path, tmp_path, *extra))
    assert exc.value.code == 2
    assert user_error(capsys).startswith(message)


@pytest.mark.parametrize("case", ["under-a-file", "not-writable"])
def test_unwritable_output_dir_fails_before_anything_runs(tmp_path, monkeypatch, capsys, case):
    # Tests run as root, which chmod does not stop: a path under a file, or os.access saying no.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "runs" if case == "under-a-file" else tmp_path / "read-only"
    if case == "not-writable":
        out.mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != out and real_access(p, mode, **kw))
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(tmp_path / "no-data", out, "--epochs", "1"))
    assert exc.value.code == 2
    reason = f"{blocker} is a file, not a folder" if case == "under-a-file" else f"{out} is not writable"
    assert user_error(capsys) == (
        f"error: cannot write to the output folder {out}: {reason}. Pass --output-dir with a writable folder."
    )


# ---------------------------------------------------------------------------------------------
# Stress
# ---------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def _children() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


@pytest.mark.slow
def test_back_to_back_fits_leak_nothing(tmp_path):
    import matplotlib.pyplot as plt

    data = write_noise_folder(tmp_path / "data", n_train=10)

    def fit(i: int) -> None:
        # Two persistent workers and TensorBoard (whose test views draw matplotlib figures).
        extra = ["--num-workers", "2", "--data.persistent_workers=true", "--logger", "tensorboard", "--name", f"r{i}"]
        fit_main(fit_args(data, tmp_path / "runs", "--epochs", "1", *extra))
        gc.collect()

    for i in range(2):  # warm-up: imports, caches and first-use allocations
        fit(i)
    rss, fds = _rss_mb(), len(os.listdir("/proc/self/fd"))
    for i in range(2, 7):
        fit(i)
    deadline = time.monotonic() + 10
    while _children() and time.monotonic() < deadline:  # workers get a moment to exit
        time.sleep(0.1)
    assert _children() == []
    assert plt.get_fignums() == []
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
    assert _rss_mb() < rss + 80, f"RSS grew from {rss:.0f} MB to {_rss_mb():.0f} MB over 5 fits"


def test_resume_with_fewer_visible_gpus_restores_the_states_it_can(monkeypatch):
    # A checkpoint from a process that saw 8 GPUs, resumed where one is visible.
    from cifar_lightning.callbacks import resume

    states = resume.collect_rng_states()
    states["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda given: restored.extend(int(s[0]) for s in given))
    resume.set_rng_states(states)
    assert restored == [0]  # GPU 0 gets the first state, and none is set on a GPU that is not there


def test_the_loss_guard_counts_optimizer_steps_under_accumulation(tiny_folder, tmp_path, monkeypatch):
    # 4 batches a step: a check every 2 optimizer steps reads the loss once at steps 2 and 4 (4 is
    # also the epoch's last batch), not at every batch of a step whose number is a multiple of 2.
    import lightning.pytorch as pl

    from cifar_lightning import CIFAR10DataModule
    from cifar_lightning.callbacks import StopOnNonFiniteLoss

    guard, checked = StopOnNonFiniteLoss(check_every=2), []
    real = StopOnNonFiniteLoss.check
    monkeypatch.setattr(StopOnNonFiniteLoss, "check", lambda self, t: checked.append(t.global_step) or real(self, t))
    dm = CIFAR10DataModule(str(tiny_folder), download=False, val_size=4, batch_size=2, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=0,
        accumulate_grad_batches=4,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(ClassifierModule(arch="simple_cnn", num_classes=3), datamodule=dm)
    assert trainer.global_step == 4 and checked == [2, 4]


class PoisonAt(Callback):
    """Turns one weight NaN before optimizer step ``step``: that step's loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def test_a_lost_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    data = write_noise_folder(tmp_path / "data", n_train=12)  # 30 training images: 15 steps an epoch
    poison = '{"class_path": "test_reliability.PoisonAt", "init_args": {"step": 20}}'
    args = fit_args(data, tmp_path / "runs", "--epochs", "3", "--batch-size", "2", f"--trainer.callbacks+={poison}")
    last = tmp_path / "runs" / "simple_cnn" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as exc:
        fit_main(args)
    assert exc.value.code == 3
    line = user_error(capsys)
    assert line.startswith("error: the training loss became NaN or infinite at epoch 2, one of steps 16-25"), line
    assert "--lr" in line and "--precision 32" in line and "gradient_clip_val" in line
    assert line.endswith(f"The last good checkpoint is {last}.")
    kept = torch.load(last, weights_only=True)
    assert kept["global_step"] == 15  # the end of epoch 0: not overwritten after the loss was lost
    assert all(torch.isfinite(t).all() for t in kept["state_dict"].values() if t.is_floating_point())
    assert not list(last.parent.glob("best-epoch001*"))  # nor a "best" checkpoint of broken weights


class _NaNAfter(LightningModule):
    """A module without ClassifierModule's running sums whose loss is NaN from step ``bad`` on."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.layer, self.bad = torch.nn.Linear(2, 1), bad

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * float("nan") if self.global_step >= self.bad else loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(40, 2)), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_loss_guard_keeps_its_own_sum_for_another_module(tmp_path):
    import lightning.pytorch as pl

    from cifar_lightning.callbacks import StopOnNonFiniteLoss
    from cifar_lightning.callbacks.guard import LossNotFinite

    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        callbacks=[StopOnNonFiniteLoss(check_every=3)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(LossNotFinite, match=r"at epoch 1, one of steps 4-6\."):
        trainer.fit(_NaNAfter(bad=4))
