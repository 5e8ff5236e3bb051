"""What a run shows on its dashboards: the resolved config, watched gradients, and the end-of-test
views (confusion matrix, a table or grid of predictions, final metrics with the hyperparameters)
sent to whichever loggers the run has."""

from __future__ import annotations

import json
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from torchmetrics.classification import MulticlassConfusionMatrix

from cifar_lightning.data.transforms import denormalize
from cifar_lightning.loggers import WandbLogger
from cifar_lightning.report import MANY_CLASSES

#: Most-confused pairs sent beyond ``MANY_CLASSES`` classes.
CONFUSED_PAIRS = 20
#: Hyperparameters left out of TensorBoard's HPARAMS view: one entry per class, no value to compare runs by.
PER_CLASS_HPARAMS = ("class_names", "superclass_names", "superclasses")


class WatchModel(Callback):
    """Starts ``wandb.watch`` on the network for every W&B logger created with ``watch=...``.

    At train start, after the TensorBoard graph was traced: watch hooks would break the tracing.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.watch_mode:
                logger.watch(pl_module.model, log=logger.watch_mode, log_freq=logger.watch_log_freq)


class ConfigSavingCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory and sends the full resolved config to W&B."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, _LightningWandbLogger):
                config = {"cli": json.loads(self.parser.dump(self.config, skip_none=False, format="json"))}
                if logger._experiment is None:
                    # Part of the run's first record when the run has not started yet.
                    logger._wandb_init.setdefault("config", {}).update(config)
                else:
                    logger.experiment.config.update(config, allow_val_change=True)


class TestResultsLogger(Callback):
    """At the end of testing, send the confusion matrix, sample predictions and final metrics.

    W&B gets a ``wandb.Table`` of ``num_samples`` test images with the true class, the predicted
    class and the top-3 probabilities, and a confusion-matrix plot. TensorBoard gets a prediction
    grid and a confusion-matrix figure, and the hyperparameters with the final test metrics (its
    HPARAMS view). The confusion matrix counts every test image of every rank; the sample of
    predictions comes from rank 0's share of the test set.

    Beyond ``MANY_CLASSES`` classes both also get the most-confused pairs (a table on W&B, a
    figure on TensorBoard), since the matrix is too large to read counts from, and the HPARAMS
    view keeps the overall metrics only. W&B draws its interactive matrix from a table of one row
    per cell, which it cuts at ``wandb.Table.MAX_ROWS`` (10,000: 100 classes); beyond that the
    matrix goes as a figure.

    Args:
        num_samples: test predictions to keep for the table and the grid.
    """

    def __init__(self, num_samples: int = 256) -> None:
        self.num_samples = num_samples
        self._confusion: MulticlassConfusionMatrix | None = None
        self._samples: list[dict[str, torch.Tensor]] = []
        self._kept = 0

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # torchmetrics' confusion matrix: the one evaluate.py reports, synchronised across ranks.
        self._confusion = MulticlassConfusionMatrix(pl_module.hparams.num_classes, validate_args=False).to(
            pl_module.device
        )
        self._samples, self._kept = [], 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or "logits" not in outputs:
            return
        logits, targets = outputs["logits"], outputs["targets"]
        n = pl_module.hparams.num_classes
        self._confusion.update(logits.argmax(dim=1), targets)
        if trainer.is_global_zero and self._kept < self.num_samples:
            take = min(self.num_samples - self._kept, len(targets))
            # Denormalise back to uint8 images (B, 3, H, W) for display; kept on the CPU.
            images = denormalize(batch[0][:take], pl_module.hparams.norm_mean, pl_module.hparams.norm_std)
            top_p, top_i = torch.softmax(logits[:take].float(), dim=1).topk(min(3, n), dim=1)
            self._samples.append(
                {
                    "images": (images * 255).round().to(torch.uint8).cpu(),
                    "targets": targets[:take].cpu(),
                    "top_p": top_p.cpu(),
                    "top_i": top_i.cpu(),
                }
            )
            self._kept += take

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        confusion = self._confusion.compute().long().cpu()  # one collective per test, on every rank
        if not trainer.is_global_zero:
            return
        samples = {k: torch.cat([s[k] for s in self._samples]) for k in self._samples[0]} if self._samples else None
        names = list(pl_module.class_names)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        groups = pl_module.hparams.get("superclasses")
        for logger in trainer.loggers:
            if isinstance(logger, _LightningWandbLogger):
                _to_wandb(logger, confusion, samples, names, groups)
            elif isinstance(logger, _LightningTensorBoardLogger):
                _to_tensorboard(logger, confusion, samples, names, pl_module, metrics, trainer.global_step)


def _to_wandb(logger, confusion: torch.Tensor, samples, names: list[str], groups=None) -> None:
    import wandb

    logs: dict[str, Any] = {}
    if len(names) ** 2 <= wandb.Table.MAX_ROWS:
        # Rebuild label vectors from the counts: wandb's confusion-matrix plot takes labels, not a matrix.
        idx = torch.arange(confusion.numel())
        pairs = torch.repeat_interleave(idx, confusion.flatten())
        y_true, y_pred = (pairs // len(names)).tolist(), (pairs % len(names)).tolist()
        logs["test/confusion_matrix"] = wandb.plot.confusion_matrix(y_true=y_true, preds=y_pred, class_names=names)
    else:
        from cifar_lightning.plots import confusion_matrix_figure

        logs["test/confusion_matrix"] = wandb.Image(confusion_matrix_figure(confusion.numpy(), names, groups=groups))
    if len(names) > MANY_CLASSES:
        from cifar_lightning.evaluation import confused_pairs

        top = confused_pairs(confusion, names, k=CONFUSED_PAIRS)
        logs["test/confused_pairs"] = wandb.Table(
            columns=["true", "predicted", "count"], data=[[p["true"], p["predicted"], p["count"]] for p in top]
        )
    if samples is not None:
        k = samples["top_i"].shape[1]
        columns = ["image", "truth", "prediction", "correct"]
        for j in range(k):
            columns += [f"top{j + 1}", f"p{j + 1}"]
        rows = []
        for img, t, ti, tp in zip(samples["images"], samples["targets"], samples["top_i"], samples["top_p"]):
            row = [wandb.Image(img.permute(1, 2, 0).numpy()), names[t], names[ti[0]], bool(ti[0] == t)]
            for j in range(k):
                row += [names[ti[j]], float(tp[j])]
            rows.append(row)
        logs["test/predictions"] = wandb.Table(columns=columns, data=rows)
    logger.experiment.log(logs)


def _to_tensorboard(logger, confusion, samples, names, pl_module, metrics, step) -> None:
    from cifar_lightning.plots import confusion_matrix_figure, predictions_grid_figure

    writer = logger.experiment
    groups = pl_module.hparams.get("superclasses")
    writer.add_figure(
        "test/confusion_matrix", confusion_matrix_figure(confusion.numpy(), names, groups=groups), global_step=step
    )
    if len(names) > MANY_CLASSES:
        from cifar_lightning.evaluation import confused_pairs
        from cifar_lightning.plots import confused_pairs_figure

        fig = confused_pairs_figure(confused_pairs(confusion, names, k=CONFUSED_PAIRS))
        writer.add_figure("test/confused_pairs", fig, global_step=step)
    if samples is not None:
        fig = predictions_grid_figure(
            samples["images"].permute(0, 2, 3, 1).numpy(),  # (N, H, W, 3) uint8
            samples["targets"].numpy(),
            samples["top_i"][:, 0].numpy(),
            names,
        )
        writer.add_figure("test/predictions", fig, global_step=step)
    # The HPARAMS view pairs each run's hyperparameters with its final metrics.
    params = {k: v for k, v in pl_module.hparams.items() if k not in PER_CLASS_HPARAMS}
    if len(names) > MANY_CLASSES:  # a column per class would bury the ones that compare runs
        metrics = {k: v for k, v in metrics.items() if not k.startswith("test/acc/")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.log_hyperparams(params, metrics={f"hp/{k}": v for k, v in metrics.items()})
