"""Experiment tracking: W&B that falls back to offline, and what a run shows on the dashboards.

``WandbLogger`` is Lightning's, plus: it goes offline by itself when there is no API key or the
server cannot be reached (training never fails because of W&B), uploads the best checkpoint only
when online, and can watch gradients on request. ``TestResultsLogger`` sends the end-of-test
views (confusion matrix, a table or grid of predictions, final metrics with the hyperparameters)
to whichever loggers the run has.
"""

from __future__ import annotations

import json
import netrc
import os
import warnings
from typing import Any, Literal
from urllib.parse import urlparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

WatchMode = Literal["gradients", "parameters", "all"]


def wandb_api_key_available() -> bool:
    """True when W&B credentials exist in the environment or in ~/.netrc (checked without network)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger that never stops training because W&B is unreachable.

    Args:
        offline: force offline mode. ``None`` (default) decides by itself: offline when
            ``WANDB_MODE`` is unset and no API key is found, or when going online fails.
        watch: log gradients and/or parameter histograms (``gradients``, ``parameters``, ``all``).
        watch_log_freq: steps between watch logs.
        log_model: upload checkpoints as artifacts (``True``: the best/last at the end); only
            when online, since an offline run cannot upload.
        init_timeout: seconds to wait for the W&B server before going offline.
        Other arguments are those of ``lightning.pytorch.loggers.WandbLogger``.
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = "runs",
        version: str | None = None,
        offline: bool | None = None,
        project: str = "cifar-lightning",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        log_model: bool | Literal["all"] = True,
        watch: WatchMode | None = None,
        watch_log_freq: int = 100,
        init_timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE", "").lower()
            offline = mode in ("offline", "dryrun", "disabled") or (not mode and not wandb_api_key_available())
            if offline and not mode:
                self._announce_offline("no W&B API key was found (set WANDB_API_KEY or run `wandb login`)", save_dir)
        self.watch_mode = watch
        self.watch_log_freq = watch_log_freq
        super().__init__(
            name=name, save_dir=save_dir, version=version, offline=offline, project=project,
            entity=entity, group=group, tags=tags, log_model=log_model and not offline,
            settings=self._settings(init_timeout), **kwargs,
        )  # fmt: skip

    @staticmethod
    def _settings(init_timeout: float):
        import wandb

        return wandb.Settings(init_timeout=init_timeout, silent=True)

    @staticmethod
    def _announce_offline(reason: str, save_dir: str) -> None:
        rank_zero_info(
            f"W&B: {reason}; logging offline. Sync later with: wandb sync {save_dir}/wandb/offline-run-*"
        )

    @property
    def experiment(self):
        try:
            return super().experiment
        except Exception as err:  # noqa: BLE001 - any failure to reach W&B must not stop training
            if self._offline:
                raise
            self._announce_offline(f"could not reach the W&B server ({type(err).__name__}: {err})", self.save_dir)
            self._offline = True
            self._log_model = False
            self._wandb_init["mode"] = "offline"
            self._experiment = None
            return super().experiment


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger whose graph is the network alone, traced in eval mode.

    Tracing the whole LightningModule drags in the metric objects, and a graph that cannot be
    traced (hooks, data-dependent branches) only warns instead of stopping the run.
    """

    @rank_zero_only
    def log_graph(self, model: torch.nn.Module, input_array: torch.Tensor | None = None) -> None:
        if not self._log_graph:
            return
        x = input_array if input_array is not None else getattr(model, "example_input_array", None)
        if x is None:
            return
        net = getattr(model, "model", model)
        was_training = net.training
        net.eval()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.experiment.add_graph(net, x.to(next(net.parameters()).device))
        except Exception as err:  # noqa: BLE001 - a graph is a nicety, never a reason to stop
            warnings.warn(f"TensorBoard: could not trace the model graph ({type(err).__name__}); skipped")
        finally:
            net.train(was_training)


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

    Args:
        num_samples: test predictions to keep for the table and the grid.
    """

    def __init__(self, num_samples: int = 256) -> None:
        self.num_samples = num_samples
        self._confusion: torch.Tensor | None = None
        self._samples: list[dict[str, torch.Tensor]] = []
        self._kept = 0

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = pl_module.hparams.num_classes
        self._confusion = torch.zeros(n, n, dtype=torch.long, device=pl_module.device)
        self._samples, self._kept = [], 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or "logits" not in outputs:
            return
        logits, targets = outputs["logits"], outputs["targets"]
        n = self._confusion.shape[0]
        preds = logits.argmax(dim=1)
        self._confusion += torch.bincount(targets * n + preds, minlength=n * n).view(n, n)
        if trainer.is_global_zero and self._kept < self.num_samples:
            take = min(self.num_samples - self._kept, len(targets))
            # Denormalise back to uint8 images (B, 3, H, W) for display; kept on the CPU.
            images = (batch[0][:take] * pl_module.input_std + pl_module.input_mean).clamp(0, 1)
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
        confusion = trainer.strategy.reduce(self._confusion, reduce_op="sum")  # one collective per test
        if not trainer.is_global_zero:
            return
        confusion = confusion.cpu()
        samples = {k: torch.cat([s[k] for s in self._samples]) for k in self._samples[0]} if self._samples else None
        names = list(pl_module.class_names)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        for logger in trainer.loggers:
            if isinstance(logger, _LightningWandbLogger):
                _to_wandb(logger, confusion, samples, names)
            elif isinstance(logger, _LightningTensorBoardLogger):
                _to_tensorboard(logger, confusion, samples, names, pl_module, metrics, trainer.global_step)


def _to_wandb(logger, confusion: torch.Tensor, samples, names: list[str]) -> None:
    import wandb

    # Rebuild label vectors from the counts: wandb's confusion-matrix plot takes labels, not a matrix.
    idx = torch.arange(confusion.numel())
    counts = confusion.flatten()
    pairs = torch.repeat_interleave(idx, counts)
    y_true, y_pred = (pairs // len(names)).tolist(), (pairs % len(names)).tolist()
    logs: dict[str, Any] = {
        "test/confusion_matrix": wandb.plot.confusion_matrix(y_true=y_true, preds=y_pred, class_names=names)
    }
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
    writer.add_figure("test/confusion_matrix", confusion_matrix_figure(confusion.numpy(), names), global_step=step)
    if samples is not None:
        fig = predictions_grid_figure(
            samples["images"].permute(0, 2, 3, 1).numpy(),  # (N, H, W, 3) uint8
            samples["targets"].numpy(),
            samples["top_i"][:, 0].numpy(),
            names,
        )
        writer.add_figure("test/predictions", fig, global_step=step)
    # The HPARAMS view pairs each run's hyperparameters with its final metrics.
    params = {k: v for k, v in pl_module.hparams.items() if k != "class_names"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.log_hyperparams(params, metrics={f"hp/{k}": v for k, v in metrics.items()})

