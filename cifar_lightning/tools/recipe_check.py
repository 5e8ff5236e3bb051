"""A recipe that cannot learn is caught in minutes: a short run of each recipe on real images.

``check_recipe`` trains a recipe as written (its network, optimizer, schedule, batch size,
augmentation and callbacks, through the same CLI as ``scripts/fit.py``) for a few steps, the
schedule laid over those steps as ``--trainer.max_steps`` lays it, then validates on a fixed
sample of held-out training images. A network that learns brings the training loss below ln(10)
= 2.303, the loss of a uniform guess, and the accuracy above the 10% of chance; one that outputs
constants or is stuck (a bad initialisation, a wrong learning rate, a broken loader) does neither.

``python scripts/check_recipes.py --data-dir DIR`` prints the measured figures next to each
recipe's thresholds (``SMOKE``); the slow tests assert them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

CHANCE_LOSS = math.log(10)


@dataclass(frozen=True)
class SmokeSpec:
    """How long a recipe's smoke run is, and what it must reach.

    steps: optimizer steps at the recipe's own batch size. max_loss: ceiling of the mean training
    loss over the last quarter of the steps. min_acc: floor of the validation accuracy on
    ``VAL_IMAGES`` held-out training images.
    """

    steps: int
    max_loss: float
    min_acc: float


#: Held-out training images the smoke run validates on (one batch of the largest recipe batch).
VAL_IMAGES = 512

#: Per recipe: steps and thresholds, chosen from measured runs (benchmarks/recipe_smoke.md): each
#: threshold sits about halfway between chance and the value measured with seed 0, so that
#: seed-to-seed noise passes and a network that does not learn fails. Heavy networks (>1 GMAC per
#: image, or 1,000+ images per step) run fewer steps.
SMOKE: dict[str, SmokeSpec] = {}


@dataclass
class SmokeResult:
    """What one smoke run measured."""

    recipe: str
    steps: int
    batch_size: int
    losses: list[float]
    val_loss: float
    val_acc: float
    seconds: float

    @property
    def late_loss(self) -> float:
        """Mean training loss over the last quarter of the steps (at least one)."""
        tail = self.losses[-max(1, len(self.losses) // 4) :]
        return sum(tail) / len(tail)

    def as_row(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "first_loss": round(self.losses[0], 4),
            "late_loss": round(self.late_loss, 4),
            "val_loss": round(self.val_loss, 4),
            "val_acc": round(self.val_acc, 4),
            "seconds": round(self.seconds, 1),
        }


class _StepLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def check_recipe(recipe: str | Path, data_dir: str | Path, steps: int, root_dir: str | Path, seed: int = 0) -> SmokeResult:
    """Train ``recipe`` for ``steps`` steps on ``data_dir`` and validate it on ``VAL_IMAGES`` images."""
    from cifar_lightning.cli import CifarCLI

    args = [
        "--config", str(recipe), "--seed_everything", str(seed),
        "--data.data_dir", str(data_dir), "--data.download", "false", "--data.num_workers", "0",
        "--data.val_size", str(VAL_IMAGES),
        # Channels-last convolutions: the same arithmetic, about a quarter cheaper on a CPU.
        "--model.channels_last", "true",
        "--trainer.max_steps", str(steps), "--trainer.num_sanity_val_steps", "0",
        "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root_dir),
    ]  # fmt: skip
    cli = CifarCLI(args=args, run=False)
    losses = _StepLosses()
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    trainer.callbacks.append(losses)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    # A fresh trainer for validation: the fit's one has limit_val_batches 0.
    (metrics,) = pl.Trainer(
        accelerator=trainer.accelerator, devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root_dir),
    ).validate(model, datamodule=dm, verbose=False)  # fmt: skip
    return SmokeResult(
        recipe=Path(recipe).stem,
        steps=trainer.global_step,
        batch_size=dm.hparams.batch_size,
        losses=losses.losses,
        val_loss=float(metrics["val/loss"]),
        val_acc=float(metrics["val/acc"]),
        seconds=seconds,
    )


def failures(result: SmokeResult, spec: SmokeSpec) -> list[str]:
    """What a smoke run missed, as sentences; empty when it passed."""
    out = []
    if result.steps != spec.steps:
        out.append(f"ran {result.steps} steps, not {spec.steps}")
    if not result.late_loss < spec.max_loss:
        out.append(f"training loss {result.late_loss:.3f} is not below {spec.max_loss} (chance: {CHANCE_LOSS:.3f})")
    if not result.val_acc > spec.min_acc:
        out.append(f"validation accuracy {result.val_acc:.3f} is not above {spec.min_acc} (chance: 0.1)")
    return out


def run_all(names: list[str], configs: Path, data_dir: str, root_dir: Path, steps: dict[str, int] | None = None) -> list[SmokeResult]:
    """Smoke runs of ``names``, printed as they finish; ``steps`` overrides ``SMOKE``'s step counts."""
    results = []
    for name in names:
        n = (steps or {}).get(name) or SMOKE[name].steps
        torch.manual_seed(0)
        result = check_recipe(configs / f"{name}.yaml", data_dir, n, root_dir / name)
        print(result.as_row(), flush=True)
        results.append(result)
    return results
