"""``history.png`` after every fit: loss, accuracy and learning rate per epoch."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from cifar_lightning.errors import UserError
from cifar_lightning.plots import plot_history


class HistoryPlot(Callback):
    """Draw ``history.png`` beside the CSV logger's ``metrics.csv`` when fitting ends (rank 0 only).

    Without a CSV logger there is nothing to read and the callback does nothing. A run too short
    to have logged an epoch gets a warning instead of a plot.
    """

    def __init__(self, filename: str = "history.png") -> None:
        self.filename = filename

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.loggers import CSVLogger

        if not trainer.is_global_zero:
            return
        logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if logger is None:
            return
        logger.save()  # the logger buffers rows until its next flush; the plot needs them all
        csv_path = Path(logger.log_dir) / "metrics.csv"
        if not csv_path.is_file():
            return
        try:
            plot_history(csv_path, csv_path.parent / self.filename)
        except UserError as err:
            warnings.warn(f"HistoryPlot: {err}", stacklevel=2)
