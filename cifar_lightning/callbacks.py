"""The callbacks every run gets by default."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback, LearningRateMonitor

from cifar_lightning.progress import progress_callback
from cifar_lightning.resilience import ContinueLogs, LastCheckpoint, RandomState

#: ModelCheckpoint settings of every run: keep the best epoch by validation accuracy. ``last.ckpt``
#: comes from ``LastCheckpoint`` after every epoch: Lightning 2.6's ``save_last`` rewrites it only
#: with a new best.
CHECKPOINT_DEFAULTS = {
    "monitor": "val/acc",
    "mode": "max",
    "save_last": False,
    "filename": "best-epoch{epoch:03d}-acc{val/acc:.4f}",
    "auto_insert_metric_name": False,
}


def default_callbacks(trainer_config: dict[str, Any]) -> list[Callback]:
    """Resumability, and a progress display and learning-rate monitor unless the trainer config
    turns them off: a rich bar on a terminal, one line per epoch otherwise (``progress``).

    Every run keeps its RNG state in checkpoints, continues its logs when resumed, and writes
    ``last.ckpt`` after every epoch and when Ctrl-C or SIGTERM stops it (see
    ``cifar_lightning.resilience``).
    """
    callbacks: list[Callback] = [RandomState(), ContinueLogs()]
    if trainer_config.get("enable_checkpointing", True) is not False:
        callbacks.append(LastCheckpoint())
    if trainer_config.get("enable_progress_bar", True) is not False:
        callbacks.append(progress_callback())
    # The model summary is Lightning's own default (RichModelSummary, depth 1 when rich is installed).
    logger = trainer_config.get("logger", True)
    if logger not in (False, None, []):
        from cifar_lightning.plots import HistoryPlot

        # history.png (loss, accuracy, learning rate per epoch) next to metrics.csv after every fit
        callbacks += [LearningRateMonitor(logging_interval="epoch"), HistoryPlot()]
    loggers = logger if isinstance(logger, list) else [logger]
    if any(getattr(lg, "watch_mode", None) for lg in loggers):
        from cifar_lightning.tracking import WatchModel

        callbacks.append(WatchModel())
    return callbacks
