"""What a run prints while it trains: a rich progress bar on a terminal; anywhere else (a log file,
SLURM, nohup, CI), where a live bar would print nothing until the end, plain lines: where the run
writes, a first estimate of its time, a line at every tenth of an epoch or every minute, and one
line per epoch. Both give the time left in the whole fit (``RunClock``)."""

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
    - ``run left``: the time the fit has left (``RunClock``), beside the bar's own time left in
      the epoch.
    - Redrawn at most every ``redraw_every`` seconds, and at the end of each epoch.
    """

    TRAIN_KEYS = ("train/loss", "train/acc")

    def __init__(self, *args: Any, read_every: float = 0.5, redraw_every: float = 0.25, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_every = read_every
        self.redraw_every = redraw_every
        self._drawn_at = -math.inf
        self._running: dict[str, float] = {}
        self._read_at = -math.inf
        self.clock = RunClock()
        self._done = 0

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs}"
        # As Lightning pads it: the bar does not jump when the validation bar's label replaces it.
        return f"{description:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._running, self._read_at, self._done = {}, -math.inf, 0
        self.clock.epoch_start()
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.clock.batch_end()
        self._done = batch_idx + 1
        # Lightning redraws the bar after every batch: hundreds of redraws a second on short steps,
        # each costing more than the step's own Python. A few a second read the same; the epoch's
        # last batch is always drawn.
        now = time.monotonic()
        if now - self._drawn_at < self.redraw_every and self._done < trainer.num_training_batches:
            return
        self._drawn_at = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.clock.validation_start()
        super().on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.clock.validation_end()
        super().on_validation_end(trainer, pl_module)

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
        left = self.clock.run_left(trainer, self._done) if trainer.training else None
        extra = {"run left": format_seconds(left)} if left is not None else {}
        if read is None:
            return {**items, **extra}
        rest = {k: v for k, v in items.items() if k not in self.TRAIN_KEYS}
        return {**self._running, **rest, **extra}


def format_seconds(seconds: float) -> str:
    """``75.3`` -> ``1:15``, ``3725`` -> ``1:02:05``: a duration as a clock would show it."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def planned_batches(trainer: pl.Trainer) -> tuple[int | None, int | None]:
    """(training batches an epoch, epochs the fit runs), each None where the run sets no limit; a
    step budget smaller than the epochs' steps ends the run first."""
    per_epoch = trainer.num_training_batches
    per_epoch = int(per_epoch) if math.isfinite(per_epoch) and per_epoch > 0 else None
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    if trainer.max_steps and trainer.max_steps > 0 and per_epoch:
        by_steps = math.ceil(trainer.max_steps * trainer.accumulate_grad_batches / per_epoch)
        epochs = min(epochs, by_steps) if epochs else by_steps
    return per_epoch, epochs


class RunClock:
    """Times a fit's training batches and validations in this process, for the time left.

    A batch takes the time from the end of the one before it in its epoch (its data included);
    the first batch of the fit, which pays for warm-up, is left out. Validations are timed apart
    and counted in the time left as often as the run validates.
    """

    def __init__(self) -> None:
        self.batch_seconds = 0.0
        self.batches = 0
        self.val_seconds: list[float] = []
        self._last_end: float | None = None
        self._val_start: float | None = None

    def epoch_start(self) -> None:
        self._last_end = None

    def batch_end(self) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self.batch_seconds += now - self._last_end
            self.batches += 1
        self._last_end = now

    def validation_start(self) -> None:
        self._val_start = time.perf_counter()

    def validation_end(self) -> None:
        if self._val_start is not None:
            self.val_seconds.append(time.perf_counter() - self._val_start)
            self._val_start = None

    @property
    def seconds_per_batch(self) -> float | None:
        return self.batch_seconds / self.batches if self.batches else None

    def epoch_left(self, trainer: pl.Trainer, batches_done: int) -> float | None:
        """Seconds left in the current epoch's training batches."""
        per_epoch, _ = planned_batches(trainer)
        step = self.seconds_per_batch
        if per_epoch is None or step is None:
            return None
        return max(0, per_epoch - batches_done) * step

    def run_left(self, trainer: pl.Trainer, batches_done: int) -> float | None:
        """Seconds left in the fit: this epoch's batches, the later epochs', and the validations."""
        per_epoch, epochs = planned_batches(trainer)
        left = self.epoch_left(trainer, batches_done)
        if left is None or epochs is None:
            return None
        later = max(0, epochs - trainer.current_epoch - 1)
        every = trainer.check_val_every_n_epoch or 1
        validations = 0
        if trainer.enable_validation and self.val_seconds:
            # an epoch whose batches are all done has been validated already
            first = trainer.current_epoch + (1 if batches_done >= per_epoch else 0)
            validations = sum(1 for e in range(first, epochs) if (e + 1) % every == 0)
        mean_val = sum(self.val_seconds) / len(self.val_seconds) if self.val_seconds else 0.0
        return left + later * per_epoch * (self.seconds_per_batch or 0.0) + validations * mean_val


def device_description(trainer: pl.Trainer) -> str:
    """``cpu (2 threads)``, ``cuda:0 (NVIDIA H100 80GB HBM3)``, with the processes of a DDP run."""
    device = trainer.strategy.root_device
    if device.type == "cuda":
        import torch

        text = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        import torch

        text = f"{device.type} ({torch.get_num_threads()} threads)"
    return text + (f" x {trainer.world_size} processes" if trainer.world_size > 1 else "")


class EpochLines(ProgressBar):
    """Plain lines for output that is not a terminal (a log file, nohup, SLURM, CI).

    - At the start: the run directory, the device, the precision, and the batches an epoch; after
      the first few batches are timed, a first estimate of the fit's time.
    - Within an epoch, a line at each tenth of it, or after ``every`` seconds without one,
      whichever comes first: the batch, the running loss and accuracy, images a second, and the
      time left in the epoch and in the run. A nohup or SLURM user can tell progress from a hang.
    - After each epoch's validation, one line:
      ``epoch 3/30  train loss 1.2345 acc 55.21%  val loss 1.1111 acc 60.02%  lr 0.0976  41.2 s  eta 18:33``

    No carriage returns and no colour codes, so a log file reads like a table. Printed by rank 0.

    Args:
        stream: where lines go (default: standard output at the time of printing).
        every: the most seconds between two lines while an epoch runs.
        estimate_after: batches timed (after the first) before the first estimate is printed.
    """

    def __init__(self, stream: TextIO | None = None, every: float = 60.0, estimate_after: int = 3) -> None:
        super().__init__()
        self._stream = stream
        self._enabled = True
        self.every, self.estimate_after = every, estimate_after
        self.clock = RunClock()
        self._epoch_start = 0.0
        self._line_at = 0.0
        self._images_since_line = 0
        self._estimated = False

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _print(self, trainer: pl.Trainer, line: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(line, file=self._stream or sys.stdout, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(trainer, start_line(trainer))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._line_at = time.perf_counter()
        self._images_since_line = 0
        self.clock.epoch_start()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.clock.batch_end()
        self._images_since_line += _batch_images(batch)
        done = batch_idx + 1
        if not self._estimated and self.clock.batches >= self.estimate_after:
            self._estimated = True
            left = self.clock.run_left(trainer, done)
            if left is not None:
                self._print(
                    trainer,
                    f"first estimate: {self.clock.seconds_per_batch:.2f} s a batch over batches 2-"
                    f"{self.clock.batches + 1}, about {format_seconds(left)} for the rest of the fit",
                )
        per_epoch, _ = planned_batches(trainer)
        now = time.perf_counter()
        tenth = per_epoch is not None and done < per_epoch and 10 * done // per_epoch > 10 * (done - 1) // per_epoch
        if (tenth or now - self._line_at >= self.every) and (per_epoch is None or done < per_epoch):
            self._print(trainer, self._batch_line(trainer, pl_module, done, now))
            self._line_at, self._images_since_line = now, 0

    def _batch_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, done: int, now: float) -> str:
        per_epoch, epochs = planned_batches(trainer)
        parts = [f"epoch {trainer.current_epoch + 1}/{epochs or '?'}"]
        parts.append(f"batch {done}/{per_epoch} ({100 * done // per_epoch}%)" if per_epoch else f"batch {done}")
        read = getattr(pl_module, "running_metrics", None)
        running = read("train") if callable(read) else {}
        if running:
            parts.append(f"train loss {running['train/loss']:.4f} acc {100 * running['train/acc']:.2f}%")
        seconds = now - self._line_at
        if seconds > 0 and self._images_since_line:
            parts.append(f"{self._images_since_line / seconds:,.0f} images/s")
        for label, value in (
            ("epoch left", self.clock.epoch_left(trainer, done)),
            ("run left", self.clock.run_left(trainer, done)),
        ):
            if value is not None:
                parts.append(f"{label} {format_seconds(value)}")
        return "  ".join(parts)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.clock.validation_start()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.clock.validation_end()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        seconds = time.perf_counter() - self._epoch_start
        per_epoch, _ = planned_batches(trainer)
        self._print(trainer, epoch_line(trainer, seconds, self.clock.run_left(trainer, per_epoch or 0)))


def _batch_images(batch: Any) -> int:
    if isinstance(batch, (tuple, list)) and batch and hasattr(batch[0], "shape"):
        return int(batch[0].shape[0])
    return 0


def start_line(trainer: pl.Trainer) -> str:
    """The run's first line: where it writes, on what it runs, and how long an epoch is."""
    per_epoch, epochs = planned_batches(trainer)
    where = trainer.log_dir or trainer.default_root_dir
    reason = getattr(trainer, "precision_reason", "as asked")
    precision = f"precision {trainer.precision}" + (f" ({reason})" if reason != "as asked" else "")
    parts = [f"run {where}", device_description(trainer), precision]
    if per_epoch:
        accumulate = trainer.accumulate_grad_batches
        steps = math.ceil(per_epoch / accumulate)
        batches = (
            f"{per_epoch:,} batches ({steps:,} steps) an epoch" if accumulate > 1 else f"{per_epoch:,} batches an epoch"
        )
        parts.append(batches + (f", {epochs} epoch{'s' if epochs > 1 else ''}" if epochs else ""))
    return "  ".join(parts)


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def epoch_line(trainer: pl.Trainer, seconds: float, left: float | None) -> str:
    """The ``EpochLines`` line for the epoch that just ended (``trainer.current_epoch``): its
    metrics, learning rate and seconds, and ``left``, the estimate of the seconds the fit has left."""
    metrics = trainer.callback_metrics
    epoch = trainer.current_epoch + 1
    _, total = planned_batches(trainer)
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
    if total is not None and epoch >= total:
        left = 0.0
    if left is not None:
        parts.append(f"eta {format_seconds(left)}")
    return "  ".join(parts)


def progress_callback(stream: TextIO | None = None) -> ProgressBar:
    """The rich bar when standard output is a terminal, else ``EpochLines``."""
    out = stream or sys.stdout
    return QuietRichProgressBar() if out.isatty() else EpochLines(stream)
