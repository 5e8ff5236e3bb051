"""Callbacks for short, fast training runs, after airbench94 (Jordan 2024, arXiv:2404.00498,
https://github.com/KellerJordan/cifar10-airbench). ``configs/fastnet.yaml`` uses all three.

They act on parameters picked by a regular expression over ``LightningModule.named_parameters()``
(for ``ClassifierModule`` the names look like ``model.groups.0.bn1.bias``), so they work with any
network and any optimizer built by the module, and need nothing from the model file.
"""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from cifar_lightning.errors import UserError


def _matching(pl_module: pl.LightningModule, pattern: str) -> list[torch.nn.Parameter]:
    params = [p for name, p in pl_module.named_parameters() if re.search(pattern, name) and p.requires_grad]
    if not params:
        names = [name for name, p in pl_module.named_parameters() if p.requires_grad]
        raise UserError(
            f"no trainable parameter name matches {pattern!r}. Names look like: {', '.join(names[:5])}, ..."
        )
    return params


class ScaleGradients(Callback):
    """Multiply the gradients of the matching parameters by ``factor`` before every optimizer step.

    With SGD this is the same as giving those parameters a learning rate ``factor`` times higher
    and a weight decay ``factor`` times lower, so that the decay per step is unchanged: airbench's
    ``bias_scaler`` (64 for the BatchNorm biases), with the module's single parameter group.
    The gradients are scaled after they are all-reduced under DDP and unscaled under fp16 AMP.
    Under SAM only the gradient it steps with (its second pass) is scaled: its perturbation is
    taken along the plain gradient of the first.

    Args:
        pattern: regular expression searched in each parameter name.
        factor: gradient multiplier.
    """

    def __init__(self, pattern: str = r"\.bn\d\.bias$", factor: float = 64.0) -> None:
        self.pattern, self.factor = pattern, factor
        self._params: list[torch.nn.Parameter] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._params = _matching(pl_module, self.pattern)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(optimizer, "perturbed", None) is False:  # SAM's first pass (optim.SAM)
            return
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, self.factor)  # one call for all of them


class FreezeAfter(Callback):
    """Stop training the matching parameters from epoch ``epochs`` on (counting from 0).

    In a single process they stop requiring gradients, so the backward pass also skips what only
    they needed (for fastnet's whitening bias: the input gradient of the first conv, ~4% of a
    step); ``on_fit_end`` gives the flag back. Under DDP, whose reducer expects the same
    parameters at every step, their gradients are dropped before each optimizer step instead.
    Either way the optimizer leaves them alone (no step, no momentum, no weight decay).
    airbench trains the whitening layer's bias for 3 epochs, then freezes it.

    Args:
        pattern: regular expression searched in each parameter name.
        epochs: number of epochs the parameters are trained for.
    """

    def __init__(self, pattern: str = r"whiten\.bias$", epochs: int = 3) -> None:
        self.pattern, self.epochs = pattern, epochs
        self._params: list[torch.nn.Parameter] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._params = _matching(pl_module, self.pattern)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= self.epochs and trainer.world_size == 1:
            for p in self._params:
                p.requires_grad_(False)
                p.grad = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.current_epoch >= self.epochs:
            for p in self._params:
                p.grad = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for p in self._params:
            p.requires_grad_(True)


class Lookahead(Callback):
    """Lookahead with a growing pull: every ``every`` steps the weights move back to their EMA.

    At step t of T, the exponential moving average of the weights (floating-point parameters and
    buffers) is updated with decay ``decay * (t / T) ** power``, then copied into the model. The
    decay grows from 0 (plain SGD early on) to ``decay`` (strong averaging at the end, when the
    learning rate is low); at the last step the model takes the average's value, so validation,
    checkpoints and the test all see it. airbench94: every 5 steps, decay 0.95 ** 5, power 3.
    The average travels in the checkpoint, so a resumed run continues it.

    Args:
        every: steps between updates.
        decay: largest EMA decay, reached at the last step.
        power: exponent of the decay's growth with training progress.
    """

    def __init__(self, every: int = 5, decay: float = 0.95**5, power: float = 3.0) -> None:
        self.every, self.decay, self.power = every, decay, power
        self._ema: list[torch.Tensor] | None = None
        self._last_step = 0

    def _tracked(self, pl_module: pl.LightningModule) -> list[torch.Tensor]:
        # state_dict() tensors share storage with the parameters and buffers they name.
        return [t for t in pl_module.state_dict().values() if t.is_floating_point()]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After on_fit_start, so data-dependent initialisation (fastnet's whitening) is included.
        tracked = self._tracked(pl_module)
        if self._ema is None or len(self._ema) != len(tracked):
            self._ema = [t.detach().clone() for t in tracked]
        else:  # restored from a checkpoint
            self._ema = [e.to(t.device) for e, t in zip(self._ema, tracked)]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        # The module knows where a resumed run with another number of steps per epoch ends.
        total = getattr(pl_module, "planned_steps", None) or int(trainer.estimated_stepping_batches)
        step = trainer.global_step
        if step == self._last_step or self._ema is None:
            return  # no optimizer step since the last call (gradient accumulation)
        self._last_step = step
        if step % self.every and step < total:
            return  # most steps: nothing to do, and no state_dict() built (Python time a step)
        tracked = self._tracked(pl_module)
        if step % self.every == 0:
            weight = 1.0 - self.decay * min(1.0, step / total) ** self.power
            torch._foreach_lerp_(self._ema, tracked, weight)
        torch._foreach_copy_(tracked, self._ema)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self._ema, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ema = state_dict["ema"]
        self._last_step = state_dict["last_step"]
