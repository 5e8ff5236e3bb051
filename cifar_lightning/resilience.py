"""Runs that survive: resume from ``last.ckpt``, stop cleanly on a signal, never leave a bad file.

What a resumed run needs beyond Lightning's own checkpoint (model, optimizer, scheduler, loops,
best-checkpoint tracking):

- the random number generators, so a run resumed at an epoch boundary draws the same shuffles
  and augmentations as one that never stopped (``RandomState``);
- its metrics log, kept and continued instead of deleted (``ResumableCSVLogger``, ``ContinueLogs``);
- a ``last.ckpt`` of the latest epoch, also written when the run is stopped (``LastCheckpoint``),
  and checkpoint files that are always complete (``AtomicCheckpointIO``).

``find_resume_checkpoint`` turns ``--resume`` / ``--ckpt_path last`` into a file, and ``fit_or_exit``
turns an interrupted fit into one line that says how to resume it.
"""

from __future__ import annotations

import csv
import errno
import logging
import os
import random
import re
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_lightning.errors import UserError

#: ``ckpt_path`` values of a fit that Lightning resolves by itself ("last" is resolved here).
LIGHTNING_CKPT_NAMES = ("best", "hpc")
LAST = "last.ckpt"
_VERSION_DIR = re.compile(r"version_(\d+)")

# ---------------------------------------------------------------------------------------------
# Checkpoint files: written atomically, checked before use
# ---------------------------------------------------------------------------------------------


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the file that was there before is unchanged."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, fsyncs it, then renames it.

    ``os.replace`` within one folder is atomic, so a kill or a full disk during a save leaves the
    previous ``last.ckpt`` intact: a reader sees the old file or the new one, never half of one.
    Lightning's own save goes through a temporary file in ``/tmp`` and ``shutil.move``, which is a
    plain copy when ``/tmp`` is another file system, and does not fsync.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as err:
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {err.strerror or err}.") from None
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError):
                hint = " Free some space or pass --output-dir on another disk." if err.errno == errno.ENOSPC else ""
                raise CheckpointWriteError(
                    f"cannot write checkpoint {path}: {err.strerror or err}. The previous "
                    f"checkpoint there, if any, is unchanged.{hint}"
                ) from None
            raise
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some file systems cannot open a folder, which is harmless.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """The trainer's ``plugins`` plus ``AtomicCheckpointIO``, unless they already name a ``CheckpointIO``."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def check_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; ``UserError`` naming the file if it is unusable."""
    from cifar_lightning.checkpoint import read_checkpoint

    return read_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Finding what to resume
# ---------------------------------------------------------------------------------------------


def _latest_last_checkpoint(name_dir: Path) -> Path | None:
    found = [
        (int(m.group(1)), d / "checkpoints" / LAST)
        for d in name_dir.glob("version_*")
        if (m := _VERSION_DIR.fullmatch(d.name)) and (d / "checkpoints" / LAST).is_file()
    ]
    return max(found)[1] if found else None


def find_resume_checkpoint(target: str | None, save_dir: str | os.PathLike, name: str | None) -> Path:
    """The checkpoint that ``--resume [target]`` (``--ckpt_path target``) continues from.

    ``target`` is ``None`` or ``"last"`` for the latest ``<save_dir>/<name>/version_N`` holding
    ``checkpoints/last.ckpt``, a run directory (its ``last.ckpt``), a folder of runs (the latest),
    or a checkpoint file. Raises ``UserError`` that names where it looked when there is none.
    """
    if target in (None, "", "last"):
        if name is None:
            where = Path(save_dir) / "checkpoints" / LAST
            found = where if where.is_file() else None
        else:
            where = Path(save_dir) / name / "version_*" / "checkpoints" / LAST
            found = _latest_last_checkpoint(Path(save_dir) / name)
        if found is None:
            raise UserError(
                f"no checkpoint to resume: nothing matches {where}. Start the run without --resume, "
                "or pass --resume PATH with a run directory or a .ckpt file."
            )
        return found
    path = Path(target).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / LAST, path / LAST):
            if candidate.is_file():
                return candidate
        latest = _latest_last_checkpoint(path)
        if latest is not None:
            return latest
        raise UserError(
            f"no checkpoint to resume in {path}: looked for {path / 'checkpoints' / LAST}, {path / LAST} "
            f"and {path / 'version_*' / 'checkpoints' / LAST}. Pass a run directory or a .ckpt file."
        )
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist. Pass a run directory or a .ckpt file to resume.")
    return path


def run_location(checkpoint: str | os.PathLike, stored_dir: str | None = None) -> tuple[str, str, int] | None:
    """``(save_dir, name, version)`` of a checkpoint under ``<save_dir>/<name>/version_N/checkpoints/``.

    ``stored_dir`` is the checkpoint folder the run recorded (``ModelCheckpoint.dirpath``). When it
    is the same folder, its spelling is kept (relative or absolute): Lightning restores the
    best-checkpoint tracking only when the folder string matches.
    """
    ckpt_dir = Path(checkpoint).parent
    if stored_dir and Path(stored_dir).resolve() == ckpt_dir.resolve():
        ckpt_dir = Path(stored_dir)
    run_dir = ckpt_dir.parent
    m = _VERSION_DIR.fullmatch(run_dir.name)
    if ckpt_dir.name != "checkpoints" or m is None:
        return None
    return str(run_dir.parent.parent), run_dir.parent.name, int(m.group(1))


#: Hyperparameters that must agree between a checkpoint and the model it is resumed into.
RESUME_KEYS = ("arch", "arch_kwargs", "num_classes", "class_names")


def check_resumable(stored: dict[str, Any], path: str | os.PathLike, hparams: dict[str, Any]) -> None:
    """``UserError`` when a checkpoint's hyperparameters (``stored``) build another network than ``hparams``."""
    for key in RESUME_KEYS:
        a, b = stored.get(key), hparams.get(key)
        if key == "class_names":
            a, b = list(a or []), list(b or [])
        if (a or None) != (b or None):
            raise UserError(
                f"cannot resume from {path}: the checkpoint has {key}={a!r}, but this run builds "
                f"{key}={b!r}. Resume with the same --arch and data, or start a new run without --resume."
            )


# ---------------------------------------------------------------------------------------------
# Random state: saved with every checkpoint, one stream per rank
# ---------------------------------------------------------------------------------------------


def collect_rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``collect_rng_states`` returned."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomState(Callback):
    """Keeps the random number generators in the checkpoint, and gives each DDP rank its own stream.

    Lightning's checkpoint has no RNG state, so a resumed run would shuffle and augment from a
    fresh stream. Restored when the checkpoint is loaded, before Lightning builds the training
    iterator, the state makes a run resumed from an epoch-end ``last.ckpt`` draw exactly what the
    uninterrupted run drew. (A run resumed mid-epoch starts a new shuffle for the rest of that
    epoch: a plain ``DataLoader`` cannot resume its iterator.)

    Under DDP every rank is seeded alike, so the weights start equal; the augmentation that runs in
    the main process (``num_workers=0``) would then draw the same crops and flips on every rank.
    At fit start, after the model is built and any checkpoint restored, each rank moves to a
    stream of its own, derived from the shared one and its rank. A single process is left as is.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"rng": collect_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_states(state_dict["rng"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            reseed_for_rank(trainer.global_rank)


def reseed_for_rank(rank: int) -> None:
    """Move torch, numpy and Python RNGs to a stream derived from the current one and ``rank``."""
    base = int(torch.randint(0, 2**62, (1,)).item())
    torch.manual_seed(base + rank)
    np.random.seed((base + rank) % 2**32)
    random.seed(base + rank)


# ---------------------------------------------------------------------------------------------
# Logs that continue
# ---------------------------------------------------------------------------------------------


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is kept and appended to."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])

    def discard_from_step(self, step: int) -> None:
        self.save()
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if r.get("step") not in (None, "") and float(r["step"]) < step]
        if len(kept) == len(rows):
            return
        if not kept:
            os.remove(self.metrics_file_path)
            self.metrics_keys = []
            return
        fd, tmp = tempfile.mkstemp(suffix=".csv", dir=self.log_dir)
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.metrics_file_path)


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that continues an existing ``metrics.csv`` instead of deleting it.

    ``ContinueLogs`` calls ``discard_from_step`` when training starts, so a resumed run keeps the
    rows logged before its checkpoint and logs everything after it once, and a new run into an
    old version folder starts a fresh file. Validation or testing into a run folder appends.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def discard_from_step(self, step: int) -> None:
        """Drop logged rows whose step is ``step`` or later (they are logged again after a resume)."""
        self.experiment.discard_from_step(step)


class ContinueLogs(Callback):
    """At train start, trims resumable logs to the rows before the restored step (0 for a new run)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.discard_from_step(trainer.global_step)


# ---------------------------------------------------------------------------------------------
# Interruptions
# ---------------------------------------------------------------------------------------------


class LastCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` after every epoch, and when Ctrl-C or SIGTERM stops training.

    Lightning 2.6's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when it saves a
    new best, so with ``save_top_k=1`` the file is a copy of the best epoch and resuming from it
    would go back in time. This callback writes it at the end of every training epoch (after that
    epoch's validation) into the ``ModelCheckpoint``'s folder. Being a ``Checkpoint``, it runs
    after the module's hooks and after ``ModelCheckpoint``, so the file records the best
    checkpoint of its own epoch.

    On SIGTERM Lightning finishes the current batch, raises ``SIGTERMException`` and calls
    ``on_exception``; a first Ctrl-C is turned into the same clean stop, because a
    ``KeyboardInterrupt`` can land between the backward pass and the optimizer step. A second
    Ctrl-C stops at once and keeps the previous ``last.ckpt``, as does a stop during validation.
    ``signal`` records what stopped the run and ``checkpoint`` the file that resumes it.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.checkpoint: str | None = None
        self._written_step = -1
        self._previous_sigint: Any = None
        self._rank_zero = True

    def _path(self, trainer: pl.Trainer) -> str:
        best = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if best is not None and best.dirpath:
            return os.path.join(best.dirpath, LAST)
        return os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints", LAST)

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        path = self._path(trainer)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb.last_model_path = path  # part of the state being saved, and of the run's report
        trainer.save_checkpoint(path, weights_only=False)  # the full state: it resumes the run
        self._written_step = trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signal, self.checkpoint = None, None
        self._written_step = trainer.global_step  # a resumed run's checkpoint already holds this step
        self._rank_zero = trainer.is_global_zero  # Ctrl-C reaches every rank; one of them says so
        if callable(signal.getsignal(signal.SIGTERM)) and _in_main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning replays the end of the restored epoch after a resume: that state is on disk.
        if self._written_step != trainer.global_step:
            self._save(trainer)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Lightning's SIGTERM handler sets the flag its loops check after each batch.
        self.signal = signal.SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self._rank_zero:
            print("\nstopping after this batch (Ctrl-C again to quit now, without a checkpoint)", file=sys.stderr)
        # Lightning's handler would also log "Received SIGTERM: 2"; the line above already says it.
        with _without_sigterm_note():
            signal.getsignal(signal.SIGTERM)(signum, frame)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and _in_main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, KeyboardInterrupt):
            self.signal = signal.SIGINT
        elif isinstance(exception, SIGTERMException):
            self.signal = self.signal or signal.SIGTERM
            # From a checkpoint taken during validation Lightning resumes after it, and that epoch
            # is never validated or logged; the previous epoch's last.ckpt repeats the epoch instead.
            if not trainer.validating and self._written_step != trainer.global_step:
                self._save(trainer)
        else:
            return
        path = self._path(trainer)
        if os.path.isfile(path):
            self.checkpoint = path


@contextmanager
def _without_sigterm_note():
    """Drop Lightning's "Received SIGTERM: N" log record while the enclosed code runs."""

    def drop(record: logging.LogRecord) -> bool:
        return "Received SIGTERM" not in record.getMessage()

    log = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _in_main_thread() -> bool:
    # Signal handlers can only be installed from the main thread.
    return threading.current_thread() is threading.main_thread()


def fit_or_exit(trainer: pl.Trainer, fit: Callable[[], Any], resume_command: Callable[[str], str]) -> Any:
    """Run ``fit()``; when a signal stops it, print how to resume and exit with 128 + the signal number.

    ``resume_command(checkpoint)`` gives the command line that continues from ``checkpoint``.
    Exit codes follow the shell: 130 for SIGINT (Ctrl-C), 143 for SIGTERM.
    """
    try:
        return fit()
    except (SystemExit, KeyboardInterrupt):
        guard = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        if guard is None or guard.signal is None:
            raise
        name = signal.Signals(guard.signal).name
        if trainer.is_global_zero:
            where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
            if guard.checkpoint:
                message = f"interrupted by {name} at {where}: resume with {resume_command(guard.checkpoint)}"
            else:
                message = f"interrupted by {name} at {where}, before any checkpoint was written"
            print(message, file=sys.stderr)
        raise SystemExit(128 + guard.signal) from None


# ---------------------------------------------------------------------------------------------
# Output folders
# ---------------------------------------------------------------------------------------------


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> None:
    """``UserError`` unless ``path`` is, or can be created as, a writable folder (nothing is created)."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        reason = f"{probe} is a file, not a folder"
    elif not os.access(probe, os.W_OK | os.X_OK):
        reason = f"{probe} is not writable"
    else:
        return
    raise UserError(f"cannot write to the {what} {path}: {reason}. Pass --output-dir with a writable folder.")
