"""A run that stops when its loss is lost: ``StopOnNonFiniteLoss``."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from cifar_lightning.checkpoint import LAST
from cifar_lightning.errors import UserError


class LossNotFinite(UserError):
    """The training loss became NaN or infinite; the message says where and what to try."""

    exit_code = 3


class StopOnNonFiniteLoss(Callback):
    """Stops training, within the epoch, once the training loss is NaN or infinite.

    A NaN or an infinity stays in a sum, so the guard reads a running sum of the epoch's losses:
    ``ClassifierModule``'s own (which it keeps for the logged training loss), or, for another
    module, one it adds each step's loss to on the device. Every ``check_every`` optimizer steps,
    after the last batch of an epoch or of the run, and before every validation of the fit, it
    reads the sum back and, under DDP, agrees with the other ranks. A lost loss raises
    ``LossNotFinite``: one line with the epoch, the step (or the steps since the last check: the
    optimizer steps the lost losses ended), what to try, and the last good checkpoint, which is
    left as it was: validation (and so the best checkpoint) and the epoch-end ``last.ckpt`` come
    after a check, and ``LastCheckpoint`` asks ``lost`` before it writes on a signal.

    Args:
        check_every: optimizer steps between reads (default 25). A read waits for the queued work
            on a GPU and costs a host round trip on a CPU; a lost loss is found at most this many
            steps late, and the message names the steps it may have happened in.
    """

    def __init__(self, check_every: int | None = None) -> None:
        self.check_every = check_every
        self._sum: torch.Tensor | None = None
        self._checked = 0  # the last step a check passed
        self._every = 25
        self._own_sum = True  # False: the module's running loss sum is read instead

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._every = self.check_every or 25
        totals = getattr(pl_module, "_train_totals", None)
        self._own_sum = not isinstance(totals, torch.Tensor)
        # The module's sum is zeroed at each epoch's start, after the previous epoch's last check.
        self._sum = torch.zeros((), device=pl_module.device) if self._own_sum else totals[0]
        self._checked = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._sum is None:
            return
        if self._own_sum:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self._sum.add_(loss.detach().float().sum())
        # The same steps on every rank: the check is a collective under DDP.
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        last_step = 0 < trainer.max_steps <= trainer.global_step
        # Counted in optimizer steps: under gradient accumulation, the batches of one step all see
        # its global_step, and only the first to see a new one checks.
        due = trainer.global_step != self._checked and trainer.global_step % self._every == 0
        if due or last_batch or last_step:
            self.check(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before a validation within or at the end of an epoch: a best checkpoint of lost weights
        # must not be saved.
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.check(trainer)

    def lost(self, trainer: pl.Trainer) -> bool:
        """Whether any rank's training loss has been NaN or infinite in this fit (a collective)."""
        bad = self._sum is not None and not math.isfinite(float(self._sum.item()))
        return trainer.strategy.reduce_boolean_decision(bad, all=False)

    def check(self, trainer: pl.Trainer) -> None:
        """Raise ``LossNotFinite`` if any rank's training loss has been lost (a collective)."""
        if self._sum is None:
            return
        if not self.lost(trainer):
            self._checked = trainer.global_step
            return
        first, last = self._checked + 1, trainer.global_step
        steps = f"step {last}" if first >= last else f"one of steps {first}-{last}"
        raise LossNotFinite(
            f"the training loss became NaN or infinite at epoch {trainer.current_epoch + 1}, {steps}. Try a lower "
            "--model.lr, --trainer.precision 32 (if the run was in 16 or bf16), or --trainer.gradient_clip_val 1.0. "
            + _last_good(trainer)
        )


def _last_good(trainer: pl.Trainer) -> str:
    """Where to pick the run up again: the latest epoch's ``last.ckpt``, else the best checkpoint."""
    best = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    candidates = []
    if best is not None and best.dirpath:
        candidates += [os.path.join(best.dirpath, LAST), best.best_model_path]
    for path in candidates:
        if path and os.path.isfile(path):
            return f"The last good checkpoint is {path}."
    return "No checkpoint was written before it."
