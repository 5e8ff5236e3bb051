"""What a run prints while it trains: a rich progress bar on a terminal, one plain line per epoch
anywhere else (a log file, SLURM, nohup, CI), where a live bar would print nothing until the end."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar


class QuietRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar, with the running training loss and accuracy of the epoch.

    - ``train/loss`` and ``train/acc`` are the means of the epoch so far on this process (under
      DDP, rank 0's share of the batches), read from the module's metric objects
      (``ClassifierModule.running_metrics``) at most once every ``read_every`` seconds and at the
      epoch's end: no read from the device per step (Lightning redraws the bar after every step),
      and no synchronisation between processes. Lightning alone would show the previous epoch's
      means, and nothing during the first.
    - Epochs count from 1, as the per-epoch lines and the report do: ``Epoch 2/2`` in the last.
    - No ``v_num``, the logger's version: the run directory already says which version it is, and
      a CSV logger's 0 showed up as ``v_num: 0.000``.
    """

    TRAIN_KEYS = ("train/loss", "train/acc")

    def __init__(self, *args: Any, read_every: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_every = read_every
        self._running: dict[str, float] = {}
        self._read_at = -math.inf

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs}"
        # As Lightning pads it: the bar does not jump when the validation bar's label replaces it.
        return f"{description:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._running, self._read_at = {}, -math.inf
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_at = -math.inf  # the epoch's final means, whenever the last read was
        super().on_train_epoch_end(trainer, pl_module)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        read = getattr(pl_module, "running_metrics", None)
        now = time.monotonic()
        if read is not None and trainer.training and now - self._read_at >= self.read_every:
            self._running = read("train")
            self._read_at = now
        if read is None:
            return items
        rest = {k: v for k, v in items.items() if k not in self.TRAIN_KEYS}
        return {**self._running, **rest}


def format_seconds(seconds: float) -> str:
    """``75.3`` -> ``1:15``, ``3725`` -> ``1:02:05``: a duration as a clock would show it."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class EpochLines(ProgressBar):
    """One plain line per training epoch, for output that is not a terminal.

    ``epoch 3/30  train loss 1.2345 acc 55.21%  val loss 1.1111 acc 60.02%  lr 0.0976  41.2 s  eta 18:33``

    No carriage returns and no colour codes, so a log file reads like a table. Printed by rank 0
    after the epoch's validation. The estimate of the time left assumes later epochs take as long
    as the mean of those run so far (in this process: a resumed run starts a new mean).

    Args:
        stream: where lines go (default: standard output at the time of printing).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream
        self._enabled = True
        self._epoch_start = 0.0
        self._durations: list[float] = []

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._epoch_start
        self._durations.append(seconds)
        if not self._enabled or trainer.sanity_checking:
            return
        line = epoch_line(trainer, seconds, sum(self._durations) / len(self._durations))
        print(line, file=self._stream or sys.stdout, flush=True)


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def epoch_line(trainer: pl.Trainer, seconds: float, mean_seconds: float) -> str:
    """The ``EpochLines`` line for the epoch that just ended (``trainer.current_epoch``)."""
    metrics = trainer.callback_metrics
    epoch = trainer.current_epoch + 1
    total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    left = None
    if trainer.max_steps and trainer.max_steps > 0:
        # A step budget ends the run first when it is smaller than the epochs' steps.
        steps_per_epoch = max(1, trainer.global_step // max(1, epoch))
        by_steps = math.ceil(trainer.max_steps / steps_per_epoch)
        total = min(total, by_steps) if total else by_steps
    if total is not None:
        left = max(0, total - epoch) * mean_seconds
    parts = [f"epoch {epoch}/{total if total is not None else '?'}"]
    for stage in ("train", "val"):
        loss, acc = _metric(metrics, f"{stage}/loss"), _metric(metrics, f"{stage}/acc")
        if loss is not None or acc is not None:
            text = f"{stage} loss {loss:.4f}" if loss is not None else f"{stage}"
            parts.append(text + (f" acc {100 * acc:.2f}%" if acc is not None else ""))
    if trainer.optimizers:
        groups = trainer.optimizers[0].param_groups
        # The module's ``lr``: with Muon, the first group holds the filters' own step size.
        group = next((g for g in groups if not g.get("muon")), groups[0])
        parts.append(f"lr {group['lr']:.4g}")
    parts.append(f"{seconds:.1f} s")
    if left is not None:
        parts.append(f"eta {format_seconds(left)}")
    return "  ".join(parts)


def progress_callback(stream: TextIO | None = None) -> ProgressBar:
    """The rich bar when standard output is a terminal, else ``EpochLines``."""
    out = stream or sys.stdout
    return QuietRichProgressBar() if out.isatty() else EpochLines(stream)
