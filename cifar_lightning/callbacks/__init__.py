"""Every callback of the project, and the ones each run gets by default (``default_callbacks``).

- ``progress``: a rich bar on a terminal, one plain line per epoch anywhere else;
- ``resume``: RNG state in checkpoints, logs that continue, ``last.ckpt`` every epoch and on a
  signal, and the resume command when a run is stopped;
- ``history``: ``history.png`` after every fit;
- ``dashboards``: the resolved config, watched gradients and the end-of-test views for W&B and
  TensorBoard;
- ``tricks``: airbench94's training tricks (gradient scaling, freezing, Lookahead);
- ``guard``: a run stops, with one line and its last good checkpoint, when its loss is lost;
- ``averaging``: averages of the weights: exponential (``EMA``, ``--ema DECAY``) and stochastic
  weight averaging (``SWA``, ``--swa LR``).

A new callback goes into one of these files (or a new one beside them) and is exported here.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback, LearningRateMonitor

from cifar_lightning.callbacks.averaging import EMA, SWA
from cifar_lightning.callbacks.dashboards import ConfigSavingCallback, TestResultsLogger, WatchModel
from cifar_lightning.callbacks.guard import LossNotFinite, StopOnNonFiniteLoss
from cifar_lightning.callbacks.history import HistoryPlot
from cifar_lightning.callbacks.progress import EpochLines, QuietRichProgressBar, progress_callback
from cifar_lightning.callbacks.resume import ContinueLogs, LastCheckpoint, RandomState, fit_or_exit
from cifar_lightning.callbacks.tricks import FreezeAfter, Lookahead, ScaleGradients

__all__ = [
    "CHECKPOINT_DEFAULTS",
    "ConfigSavingCallback",
    "ContinueLogs",
    "EMA",
    "EpochLines",
    "FreezeAfter",
    "HistoryPlot",
    "LastCheckpoint",
    "Lookahead",
    "LossNotFinite",
    "QuietRichProgressBar",
    "RandomState",
    "ScaleGradients",
    "StopOnNonFiniteLoss",
    "SWA",
    "TestResultsLogger",
    "WatchModel",
    "default_callbacks",
    "fit_or_exit",
    "progress_callback",
]

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
    turns them off: a rich bar on a terminal, one line per epoch otherwise.

    Every run keeps its RNG state in checkpoints, continues its logs when resumed, writes
    ``last.ckpt`` after every epoch and when Ctrl-C or SIGTERM stops it, and stops when its
    training loss becomes NaN or infinite. The model summary is
    Lightning's own default (RichModelSummary, depth 1 when rich is installed).
    """
    callbacks: list[Callback] = [RandomState(), ContinueLogs(), StopOnNonFiniteLoss()]
    if trainer_config.get("enable_checkpointing", True) is not False:
        callbacks.append(LastCheckpoint())
    if trainer_config.get("enable_progress_bar", True) is not False:
        callbacks.append(progress_callback())
    logger = trainer_config.get("logger", True)
    if logger not in (False, None, []):
        # history.png (loss, accuracy, learning rate per epoch) next to metrics.csv after every fit
        callbacks += [LearningRateMonitor(logging_interval="epoch"), HistoryPlot()]
    loggers = logger if isinstance(logger, list) else [logger]
    if any(getattr(lg, "watch_mode", None) for lg in loggers):
        callbacks.append(WatchModel())
    return callbacks
