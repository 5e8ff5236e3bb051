"""Runs that survive: the callbacks behind resuming and stopping cleanly.

What a resumed run needs beyond Lightning's own checkpoint (model, optimizer, scheduler, loops,
best-checkpoint tracking):

- the random number generators, so a run resumed at an epoch boundary draws the same shuffles
  and augmentations as one that never stopped (``RandomState``);
- its metrics log, kept and continued instead of deleted (``ContinueLogs`` with
  ``loggers.ResumableCSVLogger``);
- a ``last.ckpt`` of the latest epoch, also written when the run is stopped (``LastCheckpoint``).

``fit_or_exit`` turns an interrupted fit into one line that says how to resume it.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_lightning.callbacks.guard import StopOnNonFiniteLoss
from cifar_lightning.checkpoint import LAST
from cifar_lightning.loggers import ResumableCSVLogger


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
        # One state per GPU the saving process saw. Where fewer are visible (one GPU, or one
        # device per rank under SLURM), the first ones go to the GPUs there are.
        torch.cuda.set_rng_state_all(list(states["cuda"])[: torch.cuda.device_count()])


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


class ContinueLogs(Callback):
    """At train start, trims resumable logs to the rows before the restored step (0 for a new run)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.discard_from_step(trainer.global_step)


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

    Under DDP a signal may reach one rank only (a scheduler's SIGTERM to one process, ``kill``).
    Lightning's handler then runs a collective inside the signal handler, and the rank that got
    the signal would stop, and enter the collective checkpoint save, batches before the others:
    a hang. Here the handler only notes the signal; after every batch the ranks share their notes
    in one small all-reduce on a CPU (gloo) group, started asynchronously and read one batch
    later, so it never waits on the GPU. When any rank has a note, every rank stops after the same
    batch, and ``last.ckpt`` is written once, by all of them together.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.checkpoint: str | None = None
        self._written_step = -1
        self._previous_sigint: Any = None
        self._previous_sigterm: Any = None
        self._rank_zero = True
        self._noted: int = 0  # a signal this rank received, not yet shared (DDP)
        self._stop_group: Any = None  # the CPU process group the ranks share it in
        self._pending: Any = None  # (async work, flag) of the last batch's all-reduce

    def _path(self, trainer: pl.Trainer) -> str:
        best = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if best is not None and best.dirpath:
            return os.path.join(best.dirpath, LAST)
        return os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints", LAST)

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        guard = next((c for c in trainer.callbacks if isinstance(c, StopOnNonFiniteLoss)), None)
        if guard is not None and guard.lost(trainer):
            return  # lost weights: the previous last.ckpt stays the last good one
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
        self._noted, self._pending, self._stop_group = 0, None, None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Collective: every rank makes it here, before the first batch.
            self._stop_group = torch.distributed.new_group(backend="gloo")
        if callable(signal.getsignal(signal.SIGTERM)) and _in_main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
            if self._stop_group is not None:  # replaces Lightning's, which is collective
                self._previous_sigterm = signal.signal(signal.SIGTERM, self._note_sigterm)

    def _note_sigterm(self, signum: int, frame: Any) -> None:
        self.signal = self.signal or signal.SIGTERM
        self._noted = max(self._noted, signal.SIGTERM)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self._stop_group is None:
            return
        stop = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()  # started a batch ago: long done
            stop = int(flag.item())
            self._pending = None
        if stop:
            # The same batch on every rank: Lightning raises SIGTERMException after it, on all.
            self.signal = self.signal or stop
            trainer._signal_connector.received_sigterm = True
            return
        flag = torch.tensor([self._noted], dtype=torch.int32)
        work = torch.distributed.all_reduce(
            flag, op=torch.distributed.ReduceOp.MAX, group=self._stop_group, async_op=True
        )
        self._pending = (work, flag)

    def _finish_pending(self) -> None:
        # Every rank started the last all-reduce after the same batch; each completes its own.
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning replays the end of the restored epoch after a resume: that state is on disk.
        if self._written_step != trainer.global_step:
            self._save(trainer)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.signal = signal.SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self._rank_zero:
            print("\nstopping after this batch (Ctrl-C again to quit now, without a checkpoint)", file=sys.stderr)
        if self._stop_group is not None:
            self._noted = max(self._noted, signal.SIGINT)  # shared with the other ranks after the batch
            return
        # Lightning's SIGTERM handler sets the flag its loops check after each batch. It would
        # also log "Received SIGTERM: 2"; the line above already says it.
        with _without_sigterm_note():
            signal.getsignal(signal.SIGTERM)(signum, frame)

    def _restore_handlers(self) -> None:
        for signum, previous in ((signal.SIGINT, self._previous_sigint), (signal.SIGTERM, self._previous_sigterm)):
            if previous is not None and _in_main_thread():
                signal.signal(signum, previous)
        self._previous_sigint = self._previous_sigterm = None

    def _close_group(self) -> None:
        if self._stop_group is not None:
            torch.distributed.destroy_process_group(self._stop_group)
            self._stop_group = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_pending()
        self._close_group()
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        self._close_group()  # (the checkpoint below is saved over the default group)
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
            where = f"epoch {trainer.current_epoch + 1}, step {trainer.global_step}"  # epochs count from 1 everywhere
            if guard.checkpoint:
                message = f"interrupted by {name} at {where}: resume with {resume_command(guard.checkpoint)}"
            else:
                message = f"interrupted by {name} at {where}, before any checkpoint was written"
            print(message, file=sys.stderr)
        raise SystemExit(128 + guard.signal) from None
