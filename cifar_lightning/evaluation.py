"""Evaluate a checkpoint on a test set: metrics per class, confusion, mistakes, plots and a report.

Images go through the checkpoint's own normalisation (``module.normalize``), the same path that
``predict`` and the exported models take, so every consumer sees the same numbers. Metrics are
torchmetrics objects, as in training, and the overall accuracy equals what ``trainer.test``
reports for the same checkpoint and data.

Test-time augmentation is the module's own (``ClassifierModule.tta_logits``: ``flip`` averages
the logits of each image and its mirror, ``flip_translate`` adds shifted views). With a TTA mode
both the plain and the TTA numbers are reported; the confusion matrix, mistakes and plots stay
those of the plain predictions. A checkpoint trained with ``tta`` set is tested by
``trainer.test`` with it, so ``scripts/evaluate.py`` reports that mode unless told otherwise.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassPrecision,
    MulticlassRecall,
)

from cifar_lightning.errors import UserError, exit_on_user_error
from cifar_lightning.module import TTA_MODES, ClassifierModule

# ---------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) to float (N, 3, H, W) in [0, 1]: the raw input ``normalize`` expects."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # torch.from_numpy warns on read-only memory (decoded PIL images)
        images = images.copy()
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)


@contextmanager
def tta_mode(module: ClassifierModule, mode: str) -> Iterator[None]:
    """Make ``module.tta_logits`` use ``mode``: it reads the mode from the hyperparameters."""
    saved = module.hparams.get("tta", "none")
    module.hparams["tta"] = mode
    try:
        yield
    finally:
        module.hparams["tta"] = saved


@torch.no_grad()
def predict_logits(
    module: ClassifierModule,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    tta: str = "none",
) -> torch.Tensor:
    """Logits (N, C) on the CPU for uint8 images (N, H, W, 3), plain or with a TTA mode."""
    module = module.to(device).eval()
    out = []
    with tta_mode(module, tta):
        for start in range(0, len(images), batch_size):
            x = images_to_tensor(images[start : start + batch_size]).to(device)  # (B, 3, H, W)
            out.append(module.tta_logits(module.normalize(x)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, module.hparams.num_classes)


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
        out = {
            "accuracy": float(MulticlassAccuracy(c, average="micro")(preds, y)),
            "loss": self._loss(self.logits),
            "macro_precision": float(MulticlassPrecision(c, average="macro")(preds, y)),
            "macro_recall": float(MulticlassRecall(c, average="macro")(preds, y)),
            "per_class": _per_class(self.class_names, preds, y, confusion),
            "confusion_matrix": confusion.tolist(),
        }
        if self.tta_logits is not None:
            tta_preds = self.tta_logits.argmax(dim=1)
            acc = float(MulticlassAccuracy(c, average="micro")(tta_preds, y))
            per_class = MulticlassAccuracy(c, average=None)(tta_preds, y).tolist()
            out["tta"] = {
                "mode": self.tta,
                "accuracy": acc,
                "gain": acc - out["accuracy"],
                "loss": self._loss(self.tta_logits),
                "per_class_accuracy": dict(zip(self.class_names, per_class)),
            }
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

    def report(self, *, k_mistakes: int = 16, k_pairs: int = 10, **extra: Any) -> dict[str, Any]:
        """JSON-ready report: metrics, confusion, most-confused pairs, confident mistakes, ``extra``."""
        metrics = self.metrics()
        return {
            **extra,
            "num_images": len(self.labels),
            "class_names": self.class_names,
            **metrics,
            "confused_pairs": confused_pairs(metrics["confusion_matrix"], self.class_names, k=k_pairs),
            "confident_mistakes": self.confident_mistakes(k_mistakes),
            "seconds": round(self.seconds, 2),
        }


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
    tta_logits = None if tta == "none" else predict_logits(
        module, images, batch_size=batch_size, device=device, tta=tta
    )
    return Evaluation(
        class_names=list(class_names or module.class_names),
        images=images,
        labels=torch.as_tensor(labels, dtype=torch.int64),
        logits=logits,
        tta=tta,
        tta_logits=tta_logits,
        label_smoothing=float(module.hparams.get("label_smoothing", 0.0)),
        seconds=time.perf_counter() - start,
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


def print_evaluation(report: dict[str, Any], console: Console | None = None) -> None:
    """Per-class accuracy, precision, recall and support as a rich table, TTA accuracy when present."""
    console = console or Console()
    tta = report.get("tta")
    table = Table(title=f"Evaluation: {report.get('arch', '')} on {report['num_images']} images")
    for name in ("class", "accuracy", "precision", "recall", "images") + (("TTA accuracy",) if tta else ()):
        table.add_column(name, justify="left" if name == "class" else "right")
    for name, m in report["per_class"].items():
        row = [name, _pct(m["accuracy"]), _pct(m["precision"]), _pct(m["recall"]), str(m["support"])]
        table.add_row(*row, *([_pct(tta["per_class_accuracy"][name])] if tta else []))
    table.add_section()
    overall = [_pct(report["accuracy"]), _pct(report["macro_precision"]), _pct(report["macro_recall"])]
    table.add_row("overall", *overall, str(report["num_images"]), *([_pct(tta["accuracy"])] if tta else []))
    console.print(table)
    gain = f"; TTA ({tta['mode']}) changes accuracy by {100 * tta['gain']:+.2f} points" if tta else ""
    console.print(f"loss {report['loss']:.4f}{gain}")
    if report["confused_pairs"]:
        top = ", ".join(f"{p['true']}->{p['predicted']} ({p['count']})" for p in report["confused_pairs"][:5])
        console.print(f"most confused (true->predicted): {top}")


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def write_evaluation_plots(evaluation: Evaluation, report: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write confusion_matrix.png, per_class_accuracy.png, predictions_grid.png and mistakes.png."""
    from cifar_lightning import plots

    out_dir = Path(out_dir)
    names = evaluation.class_names
    tta = report.get("tta") or {}
    figures = {
        "confusion_matrix": plots.confusion_matrix_figure(report["confusion_matrix"], names),
        "per_class_accuracy": plots.per_class_accuracy_figure(
            {n: m["accuracy"] for n, m in report["per_class"].items()},
            overall=report["accuracy"],
            tta=tta.get("per_class_accuracy"),
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
    parser.add_argument("checkpoint", help="a .ckpt file written by scripts/fit.py")
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
    return parser


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse ``type`` that parses ``kind`` and refuses zero and negative values."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


@exit_on_user_error
def evaluate_main(argv: list[str] | None = None) -> dict[str, Any]:
    """``scripts/evaluate.py``: evaluate, write report.json and the plots, print the table."""
    from cifar_lightning.checkpoint import build_classifier, check_compatible, read_checkpoint, stored_data_dir
    from cifar_lightning.data import CIFAR10DataModule
    from cifar_lightning.predict import resolve_device
    from cifar_lightning.report import write_report

    args = evaluate_parser().parse_args(argv)
    device = resolve_device(args.device)
    ckpt = read_checkpoint(args.checkpoint)
    module = build_classifier(ckpt, args.checkpoint)
    data_dir = args.data_dir or stored_data_dir(ckpt, args.checkpoint) or "data"
    dm = CIFAR10DataModule(data_dir=data_dir, download=False, num_workers=0, batch_size=args.batch_size)
    check_compatible(module, class_names=dm.class_names, checkpoint=args.checkpoint, against=f"the data in {data_dir}")
    images, labels = dm.split_arrays("test")
    tta = args.tta or module.hparams.get("tta", "none")
    evaluation = evaluate(module, images, labels, batch_size=args.batch_size, device=device, tta=tta)
    out_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.checkpoint)
    report = evaluation.report(arch=module.hparams.arch, checkpoint=str(args.checkpoint), data_dir=str(data_dir))
    report["files"] = write_evaluation_plots(evaluation, report, out_dir)
    report["files"]["report"] = str(out_dir / "report.json")
    write_report(report, out_dir / "report.json")
    print_evaluation(report)
    print(f"report and plots: {out_dir}")
    return report
