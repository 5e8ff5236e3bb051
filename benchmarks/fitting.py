"""The one way a harness builds a fit: a recipe plus overrides, through the project's CLI.

Every harness (the benchmark sections, the GPU command, the recipe check, the memory probe) gets
its trainer, model and data module from ``build_fit``, so the fit it measures is the fit a user
runs with the same arguments. This is the one place for the output filters of such fits and for
which of the CLI's callbacks a harness's fit keeps.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

from lightning.pytorch.callbacks import Callback, Checkpoint

from cifar_lightning.callbacks.guard import StopOnNonFiniteLoss
from cifar_lightning.cli import CifarCLI

#: Warnings a harness's fit raises by design: its arguments are built in code, not read from
#: sys.argv; and a fit that keeps its checkpoint callback but validates nothing (an overhead or
#: memory fit) has no val/acc for it to watch.
QUIET_WARNINGS = (
    "LightningCLI's args parameter is intended",
    ".*could not find the monitored key.*",
)


def quiet() -> None:
    """Filter the warnings in ``QUIET_WARNINGS`` (idempotent)."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def build_fit(
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    checkpoints: bool = False,
    loss_guard: bool = True,
    cli_callbacks: bool = True,
    callbacks: Sequence[Callback] = (),
) -> CifarCLI:
    """The CLI's trainer, model and data module for ``recipe`` (a YAML file; None: the CLI's
    defaults) with ``overrides`` (CLI arguments, later ones win) laid over it, built, not run.

    Args:
        checkpoints: keep the CLI's checkpoint callbacks. By default a harness's fit writes no
            checkpoint: it is measured or judged, never resumed or evaluated.
        loss_guard: keep ``StopOnNonFiniteLoss`` (off where the harness judges a lost loss itself).
        cli_callbacks: keep the CLI's callbacks at all (off: only ``callbacks``, a bare trainer).
        callbacks: added after those kept.
    """
    quiet()
    cli = CifarCLI(args=[*([f"--config={recipe}"] if recipe is not None else []), *overrides], run=False)

    def kept(c: Callback) -> bool:
        if not cli_callbacks:
            return False
        return (checkpoints or not isinstance(c, Checkpoint)) and (loss_guard or not isinstance(c, StopOnNonFiniteLoss))

    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if kept(c)] + list(callbacks)
    return cli


def quiet_args(
    data_dir: str | Path, root_dir: str | Path, seed: int | None = None, accelerator: str | None = None
) -> list[str]:
    """The arguments a harness's fit starts from: its data, read as it is (no download), its
    scratch folder, no logger and no progress bar, and, when given, its seed and accelerator
    (one device)."""
    return [
        f"--data.data_dir={data_dir}",
        "--data.download=false",
        f"--trainer.default_root_dir={root_dir}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        *([f"--seed_everything={seed}"] if seed is not None else []),
        *([f"--trainer.accelerator={accelerator}", "--trainer.devices=1"] if accelerator else []),
    ]


def prepare(cli: CifarCLI) -> None:
    """Decode (and cache) the fit's training and test data now, before a clock starts."""
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")


def _callback(class_name: str, **init_args: float) -> str:
    spec = {"class_path": f"cifar_lightning.callbacks.{class_name}", "init_args": init_args}
    return f"--trainer.callbacks+={json.dumps(spec)}"


#: The training tricks a harness compares, as overrides of a recipe: ``standard`` (none) and one
#: trick each (bench's ``tricks`` section, the GPU command's ablation). MixUp and CutMix alpha 1,
#: Cutout 16, random erasing 0.5, the policies' defaults and SAM rho 0.05 are their papers'
#: settings; EMA 0.99 and SWA at 0.05 from half the run suit the short runs they are used in.
TRICKS: dict[str, list[str]] = {
    "standard": [],
    "ema": [_callback("EMA", decay=0.99)],
    "swa": [_callback("SWA", swa_lrs=0.05, swa_epoch_start=0.5, annealing_epochs=1)],
    "mixup": ["--data.mixup=1.0"],
    "cutmix": ["--data.cutmix=1.0"],
    "cutout": ["--data.cutout=16"],
    "random_erasing": ["--data.random_erasing=0.5"],
    "autoaugment": ["--data.augment=autoaugment"],
    "randaugment": ["--data.augment=randaugment"],
    "trivialaugment": ["--data.augment=trivialaugment"],
    "sam": ["--model.optimizer=sam", "--model.sam_base=sgd", "--model.sam_rho=0.05"],
}
