"""Averages of the weights: ``EMA``, an exponential moving average through Lightning's own
``EMAWeightAveraging``, and ``SWA``, stochastic weight averaging through Lightning's own
``StochasticWeightAveraging``."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

from cifar_lightning.callbacks.tricks import Lookahead
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
        super().__init__(
            decay=decay, update_every_n_steps=update_every_n_steps, update_starting_at_step=update_starting_at_step
        )
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

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._in_fit(trainer):
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class SWA(StochasticWeightAveraging):
    """Stochastic weight averaging (Izmailov et al. 2018, arXiv:1803.05407): from epoch
    ``swa_epoch_start`` on, the learning rate anneals to ``swa_lrs`` over ``annealing_epochs``
    epochs and stays there, and the weights at the start of each of those epochs are averaged with
    equal weights (Lightning's rule: the last epoch's own steps are not in the average).

    What Lightning's ``StochasticWeightAveraging`` does with it: after the last epoch the average
    replaces the weights, and one more pass over the training images, without optimizer steps,
    recomputes the BatchNorm statistics for them (the extra epoch the progress display shows; a
    network without BatchNorm gets the same epoch, which changes nothing, so that what follows
    holds for it too);
    validation then runs on the average, and the ``last.ckpt`` written after it holds it. That is
    the run's result, so ``scripts/fit.py`` tests ``last.ckpt`` rather than the best epoch's
    checkpoint (``tests_final_weights``). A checkpoint holds the average so far, so a resumed run
    continues it.

    What changes here: the average lives on the training device, where Lightning keeps it on the
    CPU; a run it cannot serve stops before the first step with what to change: a run without a
    number of epochs, a step limit that would end it before the average is used, SAM, and another
    average of the weights (``EMA``, ``Lookahead``).

    Args:
        swa_lrs: the learning rate of the averaging epochs (e.g. a tenth to a half of the peak).
        swa_epoch_start: first averaging epoch, as an epoch number from 1, or as a fraction of
            the epochs (0.75: the last quarter).
        annealing_epochs: epochs over which the learning rate moves to ``swa_lrs``.
        annealing_strategy: ``cos`` or ``linear`` annealing.
    """

    #: ``scripts/fit.py`` tests the final weights (``last.ckpt``) of a run with this callback.
    tests_final_weights = True

    def __init__(
        self,
        swa_lrs: float,
        swa_epoch_start: float = 0.75,
        annealing_epochs: int = 5,
        annealing_strategy: Literal["cos", "linear"] = "cos",
    ) -> None:
        if not swa_lrs > 0:
            raise UserError(
                f"the SWA learning rate must be positive, got {swa_lrs}. Try a tenth of the peak, e.g. 0.01."
            )
        whole = float(swa_epoch_start).is_integer() and swa_epoch_start >= 1
        if not (whole or 0.0 < swa_epoch_start < 1.0):
            raise UserError(
                f"swa_epoch_start is an epoch number from 1 or a fraction of the epochs in (0, 1), got {swa_epoch_start}."
            )
        if annealing_epochs < 1:
            raise UserError(f"annealing_epochs must be at least 1, got {annealing_epochs}.")
        start = int(swa_epoch_start) if whole else float(swa_epoch_start)
        super().__init__(
            swa_lrs=float(swa_lrs),
            swa_epoch_start=start,
            annealing_epochs=annealing_epochs,
            annealing_strategy=annealing_strategy,
            device=None,
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs in (None, -1):
            raise UserError("SWA averages the weights once an epoch and needs a number of epochs: pass --epochs N.")
        if trainer.max_steps not in (None, -1):
            raise UserError(
                f"SWA uses its average after the last epoch, and --trainer.max_steps {trainer.max_steps} can end the "
                "run before it: give the length as --epochs N only."
            )
        if pl_module.hparams.get("optimizer") == "sam":
            raise UserError(
                "SWA cannot run with --optimizer sam (its extra pass makes no optimizer step): use one of them."
            )
        others = [type(cb).__name__ for cb in trainer.callbacks if cb is not self and _averages_weights(cb)]
        if others:
            raise UserError(f"SWA and {others[0]} both average the weights: use one of them.")
        super().on_fit_start(trainer, pl_module)
        if not self._model_contains_batch_norm:
            # Lightning would copy the average in only after the fit, past the last validation and
            # last.ckpt; its extra epoch (a pass that updates nothing here) puts both after it.
            self._model_contains_batch_norm = True
            trainer.fit_loop.max_epochs += 1

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with warnings.catch_warnings():
            # Lightning says it swaps a step-wise schedule for its epoch-wise SWALR: intended here.
            warnings.filterwarnings("ignore", message="SWA is currently only supported every epoch")
            super().on_train_epoch_start(trainer, pl_module)


def _averages_weights(callback: pl.Callback) -> bool:
    return isinstance(callback, (WeightAveraging, StochasticWeightAveraging, Lookahead))
