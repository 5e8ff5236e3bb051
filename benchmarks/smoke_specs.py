"""What each recipe's smoke run is, and what it must reach: ``SmokeSpec`` and the ``SMOKE`` table."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

CHANCE_LOSS = math.log(10)


@dataclass(frozen=True)
class SmokeSpec:
    """How long a recipe's smoke run is, and what it must reach.

    Every recipe runs ``steps`` optimizer steps on the real training images at its own batch size
    (the data run), which must stay finite and end lower than it started: the mean loss of the
    last quarter of the steps below that of the first quarter.

    ``kind="learns"``: the data run must also bring the late loss below ``max_loss`` and the
    validation accuracy on ``VAL_IMAGES`` held-out images above ``min_acc``.

    ``kind="overfit"``, for a recipe whose first steps on the data cannot show learning within a
    test's budget (SGD 0.1 from the first step on a deep network blows the loss up first): the
    recipe's network, optimizer, schedule and callbacks fit one fixed batch of ``batch_images``
    unaugmented training images for ``batch_steps`` steps (the classic "overfit one batch"
    check), with the recipe's optimizer and its hyperparameters, its learning rate times
    ``batch_lr_scale``, under a short schedule: linear warm-up over the first 30% of the steps,
    then cosine to 0. The mean loss of its last ``TAIL`` steps must come within ``max_batch_loss``
    of the lowest loss the recipe's label smoothing allows (``smoothing_floor``: 0 without), far
    below ln(10), and the model in eval mode, through the validation step, must classify that
    batch with accuracy above ``min_batch_acc`` (eval-mode batch-norm statistics lag the last
    steps a little, hence not 100%).

    ``schedule``: ``laid_over_steps`` lays the recipe's schedule over the data run's steps (as
    ``--trainer.max_steps`` does); ``recipe`` runs the first ``steps`` steps of the recipe's own
    schedule, sized for its whole run (a one-cycle warm-up laid over 8 steps peaks at step 2).
    """

    steps: int
    kind: Literal["learns", "overfit"] = "learns"
    max_loss: float = CHANCE_LOSS
    min_acc: float = 0.1
    schedule: Literal["laid_over_steps", "recipe"] = "laid_over_steps"
    batch_steps: int = 0
    batch_images: int = 64
    batch_lr_scale: float = 1.0
    max_batch_loss: float = 0.5
    min_batch_acc: float = 0.7


#: Held-out training images the smoke run validates on (one batch of the largest recipe batch).
VAL_IMAGES = 512

#: Steps of the one-batch fit whose losses are averaged for its verdict.
TAIL = 5

#: Per recipe: steps and thresholds, calibrated on the JPEG copy with one thread per run; every
#: figure of the latest run is in benchmarks/recipe_smoke.json (per-step losses included) and .md.
#: Steps: enough for the loss to fall clearly, a few minutes of one core for most recipes; the
#: heavy recipes (>1 GMAC per image, or 1,000+ images a step) run fewer. Thresholds: the
#: validation floor sits above the 10% of chance and below what the recipe measured (a constant
#: guess can beat 10% on a 512-image sample, which is why the loss must also fall: a constant
#: output keeps it near ln(10)); the loss ceiling sits between the measured late loss and ln(10).
SMOKE: dict[str, SmokeSpec] = {
    "simple_cnn_tutorial": SmokeSpec(500, max_loss=2.20, min_acc=0.16),  # plain SGD 0.01: slow start
    "mynet_tutorial": SmokeSpec(30, max_loss=2.10, min_acc=0.18),
    "dainet7_tutorial": SmokeSpec(40, max_loss=2.05, min_acc=0.20),
    "resnet20_paper": SmokeSpec(60, max_loss=2.10, min_acc=0.16),
    "resnet32_paper": SmokeSpec(60, max_loss=2.18, min_acc=0.15),
    "resnet44_paper": SmokeSpec(100, max_loss=2.26, min_acc=0.14),
    "resnet110_paper": SmokeSpec(50, max_loss=2.26, min_acc=0.13),  # its lr is 0.01 for 400 steps
    "fastnet": SmokeSpec(16, max_loss=2.26, min_acc=0.18),  # label smoothing 0.2 lifts its loss
    "fastnet_muon": SmokeSpec(6, max_loss=2.15, min_acc=0.20),
    "fastnet_muon_full": SmokeSpec(6, max_loss=2.15, min_acc=0.20),  # fastnet_muon's (SAME_SMOKE_RUN)
    "resnet20_short": SmokeSpec(60, max_loss=2.20, min_acc=0.15),
    "quickstart": SmokeSpec(6, max_loss=2.15, min_acc=0.20),  # fastnet_muon's (SAME_SMOKE_RUN)
    "resnet18": SmokeSpec(40, max_loss=2.27, min_acc=0.13),
    "resnet18_cutout": SmokeSpec(40, max_loss=2.25, min_acc=0.14),
    # Trained on mixed targets, its loss stays near ln(10) for longer than a smoke run (2.23 over
    # the last 10 of 40 steps), too close for a ceiling that says more than chance; the data run
    # shows mixup trains and stays finite, one fixed batch (unmixed) shows the rest.
    "preact_resnet18_mixup": SmokeSpec(40, kind="overfit", batch_steps=30, batch_images=32),
    # Label smoothing 0.1 and SAM's two passes: 16 steps took 17 minutes on one core and ended at
    # 2.27, near ln(10); a short data run shows it stays finite and falls, one batch the rest.
    "wrn16_8_sam": SmokeSpec(8, kind="overfit", batch_steps=30, batch_images=16),
    # WRN-28-10 (5.2 GMAC an image) under AutoAugment and Cutout: its loss first rises at SGD 0.1
    # (still above its start after 8 steps), below it after 16 of the recipe's own schedule; too
    # few for its validation to leave chance, so 16 images fit in one batch show the rest.
    "wrn28_10_autoaugment": SmokeSpec(16, kind="overfit", schedule="recipe", batch_steps=30, batch_images=16),
    # ResNet-56 at SGD 0.1 from the first step blows its loss up for tens of steps (its data run's
    # losses in recipe_smoke.json), too long for a CPU smoke run to wait. One batch at SGD 0.1
    # blows up the same way in calibration; at a tenth of it the batch is learnt.
    "resnet56_paper": SmokeSpec(20, kind="overfit", batch_steps=40, batch_lr_scale=0.1),
    # The same network in 30 epochs: 40 data steps of its warm-up took its loss from 3.25 to 2.35,
    # still above ln(10) (validation 22%); one batch at a tenth of its rate shows it learns.
    "resnet56_short": SmokeSpec(20, kind="overfit", batch_steps=40, batch_lr_scale=0.1),
    # ResNet-50 with the DaiNet Adam recipe: its training loss falls within its steps, but its
    # batch-norm statistics are not settled that early (validation at chance).
    "resnet50_tutorial": SmokeSpec(16, kind="overfit", batch_steps=30),
    # ResNet-34 at SGD 0.1 and batch 256: as ResNet-56; its loss is still above where it started
    # after 12 steps, back below after 30.
    "resnet34_tutorial": SmokeSpec(30, kind="overfit", batch_steps=40, batch_lr_scale=0.1),
    # ResNet-18 at batch 512 is as slow a step as ResNet-34 at 256 on a CPU; its one-cycle peak
    # (0.4) laid over a few steps blows the loss up, so the data run takes the first steps of the
    # recipe's own warm-up instead.
    "resnet18_fast": SmokeSpec(8, kind="overfit", schedule="recipe", batch_steps=40, batch_lr_scale=0.1),
}


#: Recipes whose smoke run trains as another recipe's does, step for step: they differ only in
#: ``SMOKE_BLIND``, which ``recipe_check.smoke_differences`` checks. scripts/check_recipes.py still
#: runs them (recipe_smoke.json holds their rows, their losses their parent's); the tests compare
#: the settings and train the parent alone. The parent's spec must be a ``learns`` run laid over
#: its steps (the comparison is of such a run).
SAME_SMOKE_RUN: dict[str, str] = {
    "fastnet_muon_full": "fastnet_muon",  # all 50,000 training images, 10 epochs
    "quickstart": "fastnet_muon",  # a few steps of one epoch, no TTA
}

#: The epoch's settings: a smoke run that stays within a first epoch whose length does not shape
#: its schedule never reaches them (it stops after its steps, its schedule laid over them).
EPOCH_SETTINGS = frozenset({"trainer.max_epochs", "trainer.limit_train_batches"})

#: Settings in which two recipes may differ and still train the same smoke run: the epoch's ones
#: (where ``recipe_check._epoch_bound`` finds the run within such a first epoch), the validation
#: cadence (a smoke run validates once, after training; it holds out ``VAL_IMAGES`` whatever the
#: recipe's ``val_size``) and test-time augmentation, which no training step uses: the one
#: validation differs by it (quickstart's is a plain forward, fastnet_muon's averages 6 views).
SMOKE_BLIND = EPOCH_SETTINGS | {"trainer.check_val_every_n_epoch", "model.tta"}

#: Six of the slowest recipes' smoke runs (6 to 29 minutes each on one core, recipe_smoke.json's
#: seconds): ResNet-34 and -50, WRN-28-10 and the ResNet-18 variants (ResNet-18 itself stays in
#: CI). They run under ``pytest -m long`` and in scripts/check_recipes.py, not in every CI run,
#: whose time the others fill. A default test checks that each one's recorded run passed under its
#: current SMOKE entry with the recipe file as it is now (the row's ``recipe_sha256``): a change to
#: one of these files fails until its run is recorded again. The code they run (networks,
#: optimizers, data) is covered by every other recipe's run and by the tests of each network
#: (forward, backward, compile).
LONG_SMOKE = frozenset(
    {
        "resnet34_tutorial",
        "wrn28_10_autoaugment",
        "resnet18_fast",
        "resnet50_tutorial",
        "preact_resnet18_mixup",
        "resnet18_cutout",
    }
)
