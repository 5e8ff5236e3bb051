"""Bench's ``tricks`` section: what each training trick costs in training images/s.

Each entry of ``fitting.TRICKS`` (and ``standard``, none) runs as a ``Trainer.fit`` of
``tricks_arch`` on the tensor loader over the same real images, one after another in the same
run. A callback times each training batch from the end of the one before (loading, augmentation,
mixing, forward, backward, optimizer step, the callbacks' per-step work) after a few warm-up
batches; validation, the end of the epoch and SWA's BatchNorm pass are not counted. Every fit
runs once in each of ``tricks_rounds`` rounds and keeps its fastest. Reported: images/s of each,
and the ratio to ``standard``'s: 0.5 means the trick halves the training pace
(SAM's two passes). A policy or a mixing step shows as the share of the step it takes here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from benchmarks.bench_speed import BenchConfig
from benchmarks.fitting import TRICKS, build_fit, prepare, quiet_args


class BatchClock(Callback):
    """Seconds and images of the first epoch's training batches after ``warmup`` of them, each
    timed from the end of the one before: fetching the batch, the loader's augmentation and the
    mixing after the transfer happen before Lightning's ``on_train_batch_start``."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.seconds, self.images, self._last = warmup, 0.0, 0, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if trainer.current_epoch == 0 and batch_idx >= self.warmup:
            self.seconds += now - self._last
            self.images += len(batch[0])
        self._last = now


def _trick_fit(cfg: BenchConfig, overrides: list[str], out: Path) -> dict[str, Any]:
    args = [
        *quiet_args(cfg.data_dir, out, seed=0, accelerator=None if cfg.accelerator == "auto" else cfg.accelerator),
        f"--model.arch={cfg.tricks_arch}",
        "--data.loader=tensor",
        f"--data.batch_size={cfg.tricks_batch_size}",
        f"--data.val_size={cfg.val_size}",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=0",
        f"--trainer.limit_train_batches={cfg.tricks_warmup + cfg.tricks_steps}",
        "--trainer.enable_model_summary=false",
        *overrides,
    ]
    clock = BatchClock(cfg.tricks_warmup)
    cli = build_fit(overrides=args, callbacks=[clock])
    prepare(cli)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {
        "images_per_s": round(clock.images / clock.seconds, 1),
        "images": clock.images,
        "seconds": round(clock.seconds, 3),
    }


def mark_noise(rows: dict[str, dict[str, Any]]) -> None:
    """Give each trick's row its ratio to ``standard`` (``over_standard``), the run's own noise for
    it (``noise``: the larger of its and ``standard``'s spread over rounds, (fastest - slowest) /
    fastest; None with one round) and whether the ratio lies beyond it (``beyond_noise``): a ratio
    closer to 1 than the noise says nothing about the trick."""

    def spread(row: dict[str, Any]) -> float | None:
        seen = row["rounds_images_per_s"]
        return (max(seen) - min(seen)) / max(seen) if len(seen) > 1 and max(seen) > 0 else None

    base = rows["standard"]
    for row in rows.values():
        row["over_standard"] = round(row["images_per_s"] / base["images_per_s"], 3)
        spreads = [spread(row), spread(base)]
        row["noise"] = None if None in spreads else round(max(spreads), 3)
        row["beyond_noise"] = row["noise"] is not None and abs(row["over_standard"] - 1) > row["noise"]


def bench_tricks(cfg: BenchConfig) -> dict[str, Any]:
    """Training images/s of every trick in ``TRICKS`` and its ratio to ``standard``'s: each fit
    runs once a round, the rounds one after another, and each keeps its fastest round (what the
    machine allows it; a busy moment in one round then costs no trick more than another)."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in TRICKS}
    with tempfile.TemporaryDirectory() as out:
        for r in range(cfg.tricks_rounds):
            for name, overrides in TRICKS.items():
                runs[name].append(_trick_fit(cfg, overrides, Path(out) / f"{name}-{r}"))
    rows = {
        name: max(rs, key=lambda row: row["images_per_s"]) | {"rounds_images_per_s": [x["images_per_s"] for x in rs]}
        for name, rs in runs.items()
    }
    mark_noise(rows)
    return {
        "arch": cfg.tricks_arch,
        "batch_size": cfg.tricks_batch_size,
        "timed_steps": cfg.tricks_steps,
        "rounds": cfg.tricks_rounds,
        "overrides": TRICKS,
        "tricks": rows,
    }
