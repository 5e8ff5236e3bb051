"""Loggers: CSV that continues when resumed, W&B that falls back to offline, TensorBoard whose graph
is the network alone. ``LOGGERS`` maps the names ``--logger`` takes to their class paths.

``WandbLogger`` is Lightning's, plus: it goes offline by itself when there is no API key or the
server cannot be reached (training never fails because of W&B), uploads the best checkpoint only
when online, and can watch gradients on request (``callbacks.WatchModel``).
"""

from __future__ import annotations

import csv
import netrc
import os
import tempfile
import warnings
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

#: ``--logger`` names and the classes they build (the CSV logger is always the first).
LOGGERS = {
    "csv": "cifar_lightning.loggers.ResumableCSVLogger",
    "tensorboard": "cifar_lightning.loggers.TensorBoardLogger",
    "wandb": "cifar_lightning.loggers.WandbLogger",
}


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is kept and appended to."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])

    def discard_from_step(self, step: int) -> None:
        self.save()
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if r.get("step") not in (None, "") and float(r["step"]) < step]
        if len(kept) == len(rows):
            return
        if not kept:
            os.remove(self.metrics_file_path)
            self.metrics_keys = []
            return
        fd, tmp = tempfile.mkstemp(suffix=".csv", dir=self.log_dir)
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.metrics_file_path)


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that continues an existing ``metrics.csv`` instead of deleting it.

    ``ContinueLogs`` calls ``discard_from_step`` when training starts, so a resumed run keeps the
    rows logged before its checkpoint and logs everything after it once, and a new run into an
    old version folder starts a fresh file. Validation or testing into a run folder appends.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def discard_from_step(self, step: int) -> None:
        """Drop logged rows whose step is ``step`` or later (they are logged again after a resume)."""
        self.experiment.discard_from_step(step)


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
            name=name,
            save_dir=save_dir,
            version=version,
            offline=offline,
            project=project,
            entity=entity,
            group=group,
            tags=tags,
            log_model=log_model and not offline,
            settings=self._settings(init_timeout),
            **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:
            # Lightning always passes anonymous (None when not asked for), and W&B then warns on every
            # run that "the anonymous setting has no effect": left out, it is W&B's own default.
            self._wandb_init.pop("anonymous", None)

    @staticmethod
    def _settings(init_timeout: float):
        import wandb

        return wandb.Settings(init_timeout=init_timeout, silent=True)

    @staticmethod
    def _announce_offline(reason: str, save_dir: str) -> None:
        rank_zero_info(f"W&B: {reason}; logging offline. Sync later with: wandb sync {save_dir}/wandb/offline-run-*")

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


def evaluation_numbers(report: dict[str, Any]) -> dict[str, float]:
    """The scalars of an evaluation report worth a dashboard: accuracy (top-5 and superclass
    accuracy where the report has them), calibration, robustness."""
    numbers = {"eval/test_acc": report["test_acc"], "eval/test_loss": report["test_loss"]}
    numbers.update({f"eval/{k}": report[k] for k in ("test_acc_top5", "test_acc_superclass") if k in report})
    if "calibration" in report:
        cal = report["calibration"]
        numbers["eval/temperature"] = cal["temperature"]
        for when in ("before", "after"):
            numbers.update({f"eval/{k}_{when}_scaling": v for k, v in cal[when].items() if k != "accuracy"})
    if "corruptions" in report:
        cor = report["corruptions"]
        numbers.update(
            {"eval/corruption_mean_acc": cor["mean_accuracy"], "eval/corruption_relative_drop": cor["relative_drop"]}
        )
        numbers.update({f"eval/corruption_acc/{name}": acc for name, acc in cor["mean_by_corruption"].items()})
    return numbers


def log_evaluation(
    loggers: list[str], report: dict[str, Any], figures: dict[str, Any], checkpoint: str | os.PathLike
) -> None:
    """Send an evaluation's figures and numbers to the checkpoint's run: its TensorBoard folder
    (``<run dir>/tensorboard``) and/or W&B (an ``evaluation`` run beside the run's own, offline
    without an account). ``figures``: name -> matplotlib figure."""
    from pathlib import Path

    ckpt = Path(checkpoint)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    numbers = evaluation_numbers(report)
    if "tensorboard" in loggers:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run_dir / "tensorboard")) as writer:
            for name, fig in figures.items():
                writer.add_figure(f"eval/{name}", fig)
            for key, value in numbers.items():
                writer.add_scalar(key, value)
    if "wandb" in loggers:
        import wandb

        logger = WandbLogger(
            name=f"eval-{report['arch']}-{ckpt.stem}", save_dir=str(run_dir), job_type="evaluation", log_model=False
        )
        logger.experiment.log({**numbers, **{f"eval/{name}": wandb.Image(fig) for name, fig in figures.items()}})
        logger.experiment.finish()
