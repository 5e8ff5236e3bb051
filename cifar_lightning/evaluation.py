"""Evaluate a checkpoint on a test set: metrics per class, confusion, mistakes, plots and a report.

Images go through ``inference.predict_logits``: the checkpoint's own normalisation, applied by the
same function as in training, so every consumer sees the same numbers. Metrics are
torchmetrics objects, as in training, and the overall accuracy equals what ``trainer.test``
reports for the same checkpoint and data.

Test-time augmentation is the module's own (``ClassifierModule.tta_logits``: ``flip`` averages
the logits of each image and its mirror, ``flip_translate`` adds shifted views). With a TTA mode
both the plain and the TTA numbers are reported; the confusion matrix, mistakes and plots stay
those of the plain predictions. A checkpoint trained with ``tta`` set is tested by
``trainer.test`` with it, so ``scripts/evaluate.py`` reports that mode unless told otherwise.

Beyond 10 classes the report adds the top-5 accuracy, and for a checkpoint whose classes are
grouped (``superclasses`` in its hyperparameters, as CIFAR-100's 20) the superclass accuracy:
the same figures, from the same torchmetrics objects, as the module logs in ``trainer.test``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassPrecision,
    MulticlassRecall,
)

from cifar_lightning import plots
from cifar_lightning.errors import UserError, exit_on_user_error, positive
from cifar_lightning.inference import predict_logits, resolve_device
from cifar_lightning.module import TTA_MODES, ClassifierModule
from cifar_lightning.report import MANY_CLASSES, build_report, print_report, write_report

#: Top-5 accuracy is reported beyond this many classes, as the module logs it.
TOP5_ABOVE = 10

# ---------------------------------------------------------------------------------------------
# Predictions and metrics
# ---------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Everything measured on one test set; ``report()`` turns it into JSON-ready data."""

    class_names: list[str]
    images: np.ndarray  # (N, 32, 32, 3) uint8, for plots
    labels: torch.Tensor  # (N,) int64
    logits: torch.Tensor  # (N, C)
    tta: str  # the TTA mode of tta_logits, "none" when not asked for
    tta_logits: torch.Tensor | None  # (N, C)
    label_smoothing: float  # of the loss, as trainer.test computes it
    seconds: float
    superclasses: list[int] | None = None  # the group of each class, in label order
    superclass_names: list[str] | None = None

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=1)

    @property
    def preds(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def metrics(self) -> dict[str, Any]:
        """Overall and per-class metrics (torchmetrics), the confusion matrix and the loss."""
        c, preds, y = self.num_classes, self.preds, self.labels
        confusion = MulticlassConfusionMatrix(c)(preds, y)  # rows: true class, columns: predicted
        per_class = _per_class(self.class_names, preds, y, confusion)
        out = {
            "test_acc": float(MulticlassAccuracy(c, average="micro")(preds, y)),
            "test_loss": self._loss(self.logits),
            "per_class_acc": {name: m["accuracy"] for name, m in per_class.items()},
            "macro_precision": float(MulticlassPrecision(c, average="macro")(preds, y)),
            "macro_recall": float(MulticlassRecall(c, average="macro")(preds, y)),
            "per_class": per_class,
            "confusion_matrix": confusion.tolist(),
            **self._grouped_accuracy(self.logits),
        }
        if self.superclasses is not None:
            groups = torch.as_tensor(self.superclasses)
            per_group = MulticlassAccuracy(len(self.superclass_names), average=None)(groups[preds], groups[y])
            out["superclass_names"] = list(self.superclass_names)
            out["per_superclass_acc"] = dict(zip(self.superclass_names, per_group.tolist()))
        if self.tta_logits is not None:
            tta_preds = self.tta_logits.argmax(dim=1)
            acc = float(MulticlassAccuracy(c, average="micro")(tta_preds, y))
            tta_per_class = MulticlassAccuracy(c, average=None)(tta_preds, y).tolist()
            out["tta"] = {
                "mode": self.tta,
                "test_acc": acc,
                "gain": acc - out["test_acc"],
                "test_loss": self._loss(self.tta_logits),
                "per_class_acc": dict(zip(self.class_names, tta_per_class)),
                **self._grouped_accuracy(self.tta_logits),
            }
        return out

    def _grouped_accuracy(self, logits: torch.Tensor) -> dict[str, float]:
        """Top-5 accuracy beyond 10 classes, and the superclass accuracy of grouped classes: a
        prediction counts when its class is in the true class's group."""
        out, y = {}, self.labels
        if self.num_classes > TOP5_ABOVE:
            out["test_acc_top5"] = float(MulticlassAccuracy(self.num_classes, top_k=5, average="micro")(logits, y))
        if self.superclasses is not None:
            groups = torch.as_tensor(self.superclasses)
            accuracy = MulticlassAccuracy(len(self.superclass_names), average="micro")
            out["test_acc_superclass"] = float(accuracy(groups[logits.argmax(dim=1)], groups[y]))
        return out

    def _loss(self, logits: torch.Tensor) -> float:
        # The objective trainer.test reports as test/loss, label smoothing included.
        return float(F.cross_entropy(logits, self.labels, label_smoothing=self.label_smoothing))

    def confident_mistakes(self, k: int = 16) -> list[dict[str, Any]]:
        """The ``k`` wrong predictions made with the highest probability, most confident first."""
        probs, preds = self.probs, self.preds
        wrong = torch.nonzero(preds != self.labels).flatten()
        confidence = probs[wrong, preds[wrong]]
        order = wrong[torch.argsort(confidence, descending=True)][:k]
        return [
            {
                "index": int(i),
                "true": self.class_names[int(self.labels[i])],
                "predicted": self.class_names[int(preds[i])],
                "confidence": float(probs[i, preds[i]]),
                "true_probability": float(probs[i, self.labels[i]]),
            }
            for i in order
        ]

    def report(
        self, *, arch: str, checkpoint: str | None, k_mistakes: int = 16, k_pairs: int | None = None, **extra: Any
    ) -> dict[str, Any]:
        """The report (``report.build_report``): metrics, confusion, most-confused pairs (``k_pairs``,
        default 10, or 20 beyond ``MANY_CLASSES`` classes), confident mistakes, then ``extra``."""
        metrics = self.metrics()
        if k_pairs is None:
            k_pairs = 10 if self.num_classes <= MANY_CLASSES else 20
        return build_report(
            arch=arch,
            class_names=self.class_names,
            test_images=len(self.labels),
            checkpoint=checkpoint,
            **metrics,
            confused_pairs=confused_pairs(metrics["confusion_matrix"], self.class_names, k=k_pairs),
            confident_mistakes=self.confident_mistakes(k_mistakes),
            seconds=round(self.seconds, 2),
            **extra,
        )


def _per_class(class_names: list[str], preds: torch.Tensor, y: torch.Tensor, confusion: torch.Tensor) -> dict:
    c = len(class_names)
    # Per-class accuracy is the recall of that class; both are kept under their usual names.
    acc = MulticlassAccuracy(c, average=None)(preds, y).tolist()
    precision = MulticlassPrecision(c, average=None)(preds, y).tolist()
    recall = MulticlassRecall(c, average=None)(preds, y).tolist()
    support = confusion.sum(dim=1).tolist()
    return {
        name: {"accuracy": acc[i], "precision": precision[i], "recall": recall[i], "support": int(support[i])}
        for i, name in enumerate(class_names)
    }


def evaluate(
    module: ClassifierModule,
    images: np.ndarray,
    labels: np.ndarray | torch.Tensor,
    *,
    class_names: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    tta: str = "none",
) -> Evaluation:
    """Predict every image (uint8 (N, 32, 32, 3)), plain and with ``tta`` unless it is ``none``."""
    if tta not in TTA_MODES:
        raise UserError(f"unknown TTA mode {tta!r}. Valid modes: {', '.join(TTA_MODES)}")
    start = time.perf_counter()
    logits = predict_logits(module, images, batch_size=batch_size, device=device)
    tta_logits = (
        None if tta == "none" else predict_logits(module, images, batch_size=batch_size, device=device, tta=tta)
    )
    superclasses = module.hparams.get("superclasses")
    return Evaluation(
        class_names=list(class_names or module.class_names),
        images=images,
        labels=torch.as_tensor(labels, dtype=torch.int64),
        logits=logits,
        tta=tta,
        tta_logits=tta_logits,
        label_smoothing=float(module.hparams.get("label_smoothing", 0.0)),
        seconds=time.perf_counter() - start,
        superclasses=None if superclasses is None else list(superclasses),
        superclass_names=None if superclasses is None else list(module.hparams["superclass_names"]),
    )


def confused_pairs(
    confusion: Sequence[Sequence[int]] | torch.Tensor,
    class_names: Sequence[str],
    *,
    k: int = 10,
    symmetric: bool = False,
) -> list[dict[str, Any]]:
    """The ``k`` largest off-diagonal cells of a confusion matrix (rows true, columns predicted).

    With ``symmetric`` a pair counts both directions (cat taken for dog and dog for cat), which
    answers "which classes does the model mix up"; without it, "true" and "predicted" are kept.
    """
    m = torch.as_tensor(confusion, dtype=torch.int64).clone()
    if symmetric:
        m = torch.triu(m + m.T, diagonal=1)
    m.fill_diagonal_(0)
    counts, flat = torch.sort(m.flatten(), descending=True)
    pairs = []
    for count, idx in zip(counts.tolist(), flat.tolist()):
        if count == 0 or len(pairs) == k:
            break
        i, j = divmod(idx, m.shape[1])
        if symmetric:
            pairs.append({"classes": [class_names[i], class_names[j]], "count": count})
        else:
            pairs.append({"true": class_names[i], "predicted": class_names[j], "count": count})
    return pairs


# ---------------------------------------------------------------------------------------------
# Output: table, plots, report file
# ---------------------------------------------------------------------------------------------


def write_evaluation_plots(evaluation: Evaluation, report: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write confusion_matrix.png, confused_pairs.png, per_class_accuracy.png, predictions_grid.png
    and mistakes.png."""
    out_dir = Path(out_dir)
    names = evaluation.class_names
    tta = report.get("tta") or {}
    figures = {
        "confusion_matrix": plots.confusion_matrix_figure(
            report["confusion_matrix"], names, groups=evaluation.superclasses
        ),
        "confused_pairs": plots.confused_pairs_figure(report["confused_pairs"]),
        "per_class_accuracy": plots.per_class_accuracy_figure(
            {n: m["accuracy"] for n, m in report["per_class"].items()},
            overall=report["test_acc"],
            tta=tta.get("per_class_acc"),
            tta_label=f"TTA ({tta.get('mode')})",
        ),
        "predictions_grid": plots.predictions_grid_figure(
            evaluation.images, evaluation.labels.numpy(), evaluation.preds.numpy(), names
        ),
        "mistakes": plots.mistakes_figure(evaluation.images, report["confident_mistakes"]),
    }
    return {name: str(plots.save_figure(fig, out_dir / f"{name}.png")) for name, fig in figures.items()}


# ---------------------------------------------------------------------------------------------
# scripts/evaluate.py
# ---------------------------------------------------------------------------------------------


def default_output_dir(checkpoint: str | Path) -> Path:
    """``<run dir>/eval/<checkpoint name>/`` for runs/<arch>/version_N/checkpoints/x.ckpt, else beside it."""
    ckpt = Path(checkpoint)
    base = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return base / "eval" / ckpt.stem


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/evaluate.py",
        description="Evaluate a checkpoint on the test split: report.json, plots and a table.",
    )
    parser.add_argument(
        "checkpoint", help="a .ckpt file written by scripts/fit.py, or a network with trained weights (resnet20)"
    )
    parser.add_argument(
        "--data-dir",
        help="data folder or archive (default: the one the checkpoint was trained on, else 'data')",
    )
    parser.add_argument("--output-dir", help="where the report and plots go (default: <run dir>/eval/<ckpt name>/)")
    parser.add_argument(
        "--tta",
        nargs="?",
        const="flip",
        choices=TTA_MODES,
        help="also report test-time augmentation: flip (the default of a bare --tta), flip_translate, or "
        "none (default: the checkpoint's own tta setting, which trainer.test uses)",
    )
    parser.add_argument("--batch-size", type=positive(int), default=256)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    parser.add_argument(
        "--calibration",
        action="store_true",
        help="ECE (15 bins), NLL and Brier score before and after temperature scaling fitted on the validation "
        "split; writes reliability.png and the temperature that predict.py --calibrated uses",
    )
    parser.add_argument(
        "--corruptions",
        action="store_true",
        help="accuracy under 15 CIFAR-10-C-style corruptions x 5 severities, computed locally; writes corruptions.png",
    )
    parser.add_argument(
        "--corruptions-subset",
        type=int,
        default=DEFAULT_CORRUPTION_IMAGES,
        metavar="N",
        help=f"test images to corrupt, a fair sample (default {DEFAULT_CORRUPTION_IMAGES}; 0 = all)",
    )
    parser.add_argument("--corruption-seed", type=int, default=0, help="seed of the corruptions (default 0)")
    parser.add_argument(
        "--logger",
        action="append",
        choices=("tensorboard", "wandb"),
        default=[],
        help="also send the figures and numbers to the run's TensorBoard folder or to W&B (repeatable)",
    )
    return parser


#: Test images ``--corruptions`` uses by default: 75 corrupted copies of each are predicted.
DEFAULT_CORRUPTION_IMAGES = 1000


def _validation_arrays(ckpt: dict[str, Any], data_dir: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation split the checkpoint was selected on (its data module's val_size and split_seed)."""
    from cifar_lightning.checkpoint import stored_dataset
    from cifar_lightning.data import CIFAR10DataModule

    stored = ckpt.get("datamodule_hyper_parameters") or {}
    val_size, split_seed = stored.get("val_size", 0.1), stored.get("split_seed", 0)
    if val_size == 0:
        raise UserError(
            "--calibration fits its temperature on the validation split, and this checkpoint was trained with "
            "--val-size 0 (no validation images). Use a checkpoint trained with held-out validation images."
        )
    dm = CIFAR10DataModule(
        data_dir=data_dir,
        download=False,
        num_workers=0,
        batch_size=batch_size,
        val_size=val_size,
        split_seed=split_seed,
        **stored_dataset(ckpt),
    )
    return dm.split_arrays("val")


def fair_subset(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images in the evaluation order (a fair sample), kept in file order."""
    from cifar_lightning.data import evaluation_order

    if n <= 0 or n >= len(images):
        return images, labels
    idx = np.sort(evaluation_order(np.arange(len(images)))[:n])
    return images[idx], labels[idx]


@exit_on_user_error
def evaluate_main(argv: list[str] | None = None) -> dict[str, Any]:
    """``scripts/evaluate.py``: evaluate, write report.json and the plots, print the table."""
    from cifar_lightning.checkpoint import (
        build_classifier,
        check_compatible,
        read_checkpoint,
        stored_data_dir,
        stored_dataset,
    )
    from cifar_lightning.data import CIFAR10DataModule

    args = evaluate_parser().parse_args(argv)
    device = resolve_device(args.device)
    ckpt = read_checkpoint(args.checkpoint)
    module = build_classifier(ckpt, args.checkpoint)
    data_dir = args.data_dir or stored_data_dir(ckpt, args.checkpoint) or "data"
    dm = CIFAR10DataModule(
        data_dir=data_dir, download=False, num_workers=0, batch_size=args.batch_size, **stored_dataset(ckpt)
    )
    check_compatible(module, class_names=dm.class_names, checkpoint=args.checkpoint, against=f"the data in {data_dir}")
    images, labels = dm.split_arrays("test")
    tta = args.tta or module.hparams.get("tta", "none")
    evaluation = evaluate(module, images, labels, batch_size=args.batch_size, device=device, tta=tta)
    out_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.checkpoint)
    report = evaluation.report(arch=module.hparams.arch, checkpoint=str(args.checkpoint), data_dir=str(data_dir))
    report["files"] = write_evaluation_plots(evaluation, report, out_dir)
    figures = {}
    if args.calibration:
        from cifar_lightning.calibration import calibration_report

        val_images, val_labels = _validation_arrays(ckpt, data_dir, args.batch_size)
        val_logits = predict_logits(module, val_images, batch_size=args.batch_size, device=device)
        report["calibration"] = calibration_report(
            val_logits, torch.as_tensor(val_labels), evaluation.logits, evaluation.labels
        )
        figures["reliability"] = plots.reliability_figure(report["calibration"])
    if args.corruptions:
        from cifar_lightning.corruptions import corruption_report
        from cifar_lightning.data.archives import default_cache_dir

        start = time.perf_counter()
        sub_images, sub_labels = fair_subset(images, np.asarray(labels), args.corruptions_subset)
        report["corruptions"] = corruption_report(
            module,
            sub_images,
            sub_labels,
            seed=args.corruption_seed,
            cache_dir=default_cache_dir() / "corruptions",
            batch_size=args.batch_size,
            device=device,
        )
        report["corruptions"]["seconds"] = round(time.perf_counter() - start, 1)
        figures["corruptions"] = plots.corruptions_figure(report["corruptions"])
    for name, fig in figures.items():
        report["files"][name] = str(plots.save_figure(fig, out_dir / f"{name}.png"))
    report["files"]["report"] = str(out_dir / "report.json")
    write_report(report, out_dir / "report.json")
    if args.logger:
        from cifar_lightning.loggers import log_evaluation

        log_evaluation(args.logger, report, figures, args.checkpoint)
    print_report(report)
    print(f"report and plots: {out_dir}")
    return report
