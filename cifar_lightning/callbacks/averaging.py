"""Averages of the weights: ``EMA``, an exponential moving average through Lightning's own
``EMAWeightAveraging``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging

from cifar_lightning.errors import UserError


class EMA(EMAWeightAveraging):
    """An exponential moving average of the weights and buffers, updated after every optimizer
    step: ``average = decay * average + (1 - decay) * weights`` (the first step copies them).

    What Lightning's ``EMAWeightAveraging`` does with it: validation runs on the average; at the
    end of the fit the average replaces the trained weights, so the test does too; a checkpoint
    holds the average as its ``state_dict`` (so evaluate, predict and export use it) and the
    trained weights beside it, so a resumed run continues both.

    What changes here:
    - the average lives on the training device (each rank's own under DDP), where Lightning would
      keep it where the module was when the fit was set up, the CPU, and copy every weight across
      at every step;
    - outside the fit (the test of the best checkpoint after it, a later validate) the callback
      does nothing: the checkpoint's ``state_dict`` is already the average, where Lightning would
      load the trained weights over it, or swap in the average of the fit's last step.

    Args:
        decay: weight of the average at each update, in (0, 1); 0.999 averages about the last
            1,000 steps.
        update_every_n_steps: steps between updates.
        update_starting_at_step: first step to update at (None: the first).
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, update_starting_at_step: int | None = None):
        if not 0.0 < decay < 1.0:
            raise UserError(f"the EMA decay must be between 0 and 1 (exclusive), got {decay}. Try 0.999.")
        super().__init__(decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step)  # fmt: skip
        self.decay = decay

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._device is None:
            self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)

    def _in_fit(self, trainer: pl.Trainer) -> bool:
        return trainer.state.fn == "fit"

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_fit(trainer):
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_fit(trainer):
            super().on_validation_epoch_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._in_fit(trainer):
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
