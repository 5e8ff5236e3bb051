"""The GPU command's ablation section: resnet18 on a short schedule with one training trick at a
time, over two seeds, beside the same schedule without it.

Each variant is ``configs/resnet18_fast.yaml`` cut to ``ABLATION_EPOCHS`` epochs on all 50,000
training images (tested with its TTA, as the other timed fits), with the overrides of one entry of
``VARIANTS``. Seed 0 of every variant runs first, then seed 1 of those that still fit before the
deadline, so a short window still gets one figure of each. The settings are those of
``fitting.TRICKS`` (mixup and CutMix alpha 1, Cutout 16, SAM rho 0.05: the papers'), not tuned
for so short a schedule: the figures say what each trick costs in time and what it does to a
short run, not what it gives at 200 epochs.
"""

from __future__ import annotations

import dataclasses
import time

from benchmarks.fitting import TRICKS
from benchmarks.gpu_sections import Context, timed_fit

#: Epochs of each ablation run (resnet18_fast's schedule laid over them).
ABLATION_EPOCHS = 4

#: The variants: the baseline and one trick each (the same list as bench's tricks section).
VARIANTS = TRICKS

SEEDS = 2

#: --quick (the CPU check of the code): the baseline, the callbacks, a batch mix and SAM.
QUICK_VARIANTS = ("standard", "ema", "swa", "mixup", "sam")


def section_ablation(ctx: Context) -> None:
    """Every variant of ``VARIANTS`` over ``SEEDS`` seeds while the deadline allows; the results'
    ``runs`` and ``baseline`` give each one's accuracy and time beside ``standard``'s."""
    config, res = ctx.configs / "resnet18_fast.yaml", ctx.results
    short = [f"--trainer.max_epochs={ABLATION_EPOCHS}", f"--trainer.check_val_every_n_epoch={ABLATION_EPOCHS}"]
    res.update(epochs=ABLATION_EPOCHS, recipe=config.name, overrides={k: [*short, *v] for k, v in VARIANTS.items()})
    if ctx.cuda:  # cuDNN autotuning off the clock
        res["warmup"] = timed_fit(
            ctx,
            config,
            0,
            ["--trainer.max_epochs=1", "--trainer.limit_train_batches=10", "--trainer.limit_test_batches=2"],
        )
    variants = {k: v for k, v in VARIANTS.items() if not ctx.quick or k in QUICK_VARIANTS}
    runs: dict[str, list] = {name: [] for name in variants}
    res["runs"], res["baseline"], last = runs, "standard", dict.fromkeys(variants, 0.0)
    for seed in range(1 if ctx.quick else SEEDS):
        for name, overrides in variants.items():
            if seed and ctx.left() < 1.1 * last[name]:
                continue
            run_ctx = ctx
            if ctx.quick and name == "swa":  # SWA needs the run's length in epochs, not --quick's max_steps
                run_ctx = dataclasses.replace(ctx, extra=[*ctx.extra, "--trainer.max_steps=-1"])
            start = time.perf_counter()
            runs[name].append(timed_fit(run_ctx, config, seed, [*short, *overrides]))
            last[name] = time.perf_counter() - start
            ctx.save()
