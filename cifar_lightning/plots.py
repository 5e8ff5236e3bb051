"""Figures: confusion matrix, most-confused pairs, per-class accuracy, prediction grids, mistakes,
reliability diagrams, corruption heat maps and training history.

Beyond ``report.MANY_CLASSES`` classes (CIFAR-100, a large image folder) the per-class figures
take a compact form that stays readable and of bounded size: the confusion matrix sorted, without
numbers in its cells and with as many tick labels as fit; per-class accuracy as the worst and best
classes only. Up to that many, they are drawn as they always were.

Every function returns a matplotlib ``Figure`` drawn on an Agg canvas, without pyplot: no global
figure state, no GUI backend, safe in threads and callbacks, and a notebook still displays the
returned figure. ``save_figure`` writes a PNG and frees the figure.

``callbacks.HistoryPlot`` draws ``history.png`` with ``plot_history`` when a fit ends.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from cifar_lightning.errors import UserError, exit_on_user_error
from cifar_lightning.report import MANY_CLASSES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RIGHT, WRONG = "#1a7f37", "#cf222e"  # green and red that stay distinct on white and in print
GRID_SIZE = 64  # images in predictions_grid.png: an 8 x 8 grid
MAX_INCHES = 18.0  # the side of a confusion matrix of many classes: 1,800 px at 100 dpi
BARS_AT_EACH_END = 10  # classes at each end (best, worst) of per_class_accuracy.png beyond MANY_CLASSES


def new_figure(width: float, height: float) -> Figure:
    """A figure (inches) on an Agg canvas; matplotlib is imported here, so importing this module is cheap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------------------------------------
# Evaluation figures
# ---------------------------------------------------------------------------------------------


def confusion_matrix_figure(
    confusion: Sequence[Sequence[int]], class_names: Sequence[str], *, groups: Sequence[int] | None = None
) -> Figure:
    """Counts in each cell, coloured by the share of the true class (row), so rare classes show too.

    Beyond ``MANY_CLASSES`` classes the cells carry no numbers, and rows and columns are sorted:
    by superclass when ``groups`` gives each class's group (lines between the groups, so a model
    that confuses classes within a group shows blocks on the diagonal), else by accuracy, best
    first. Tick labels are thinned to what the figure's fixed size can show.
    """
    m = np.asarray(confusion, dtype=np.int64)  # (C, C): rows true, columns predicted
    names, c = list(class_names), len(class_names)
    title, boundaries = "Confusion matrix", np.array([])
    if c > MANY_CLASSES:
        accuracy = np.diag(m) / np.maximum(m.sum(axis=1), 1)
        if groups is not None:
            order = np.lexsort((-accuracy, np.asarray(groups)))  # by group, best class first within it
            boundaries = np.flatnonzero(np.diff(np.asarray(groups)[order])) + 0.5
            title += ", classes grouped by superclass"
        else:
            order = np.argsort(-accuracy, kind="stable")  # best first, label order among ties
            title += ", classes sorted by accuracy (best first)"
        m, names = m[np.ix_(order, order)], [names[i] for i in order]
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = min(max(5.0, 0.6 * c + 2), MAX_INCHES)
    fig = new_figure(size + 1, size)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="share of the true class", shrink=0.8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if c <= MANY_CLASSES:
        ax.set(xticks=range(c), yticks=range(c))
        ax.set_xticklabels(names, rotation=45, ha="right")
        ax.set_yticklabels(names)
        for i in range(c):
            for j in range(c):
                ax.text(
                    j,
                    i,
                    str(m[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black",
                )
        return fig
    # The axes get about 70% of the side; a label needs some 5 pt of it to stay legible.
    row_pt = 0.7 * size * 72 / c
    step = max(1, math.ceil(5 / row_pt))
    ticks = list(range(0, c, step))
    font = min(8.0, max(5.0, 0.9 * row_pt * step))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=font)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=font)
    for b in boundaries:
        ax.axhline(b, color="#888888", linewidth=0.5)
        ax.axvline(b, color="#888888", linewidth=0.5)
    return fig


def confused_pairs_figure(pairs: Sequence[Mapping[str, Any]]) -> Figure:
    """The most-confused pairs (``evaluation.confused_pairs``) as bars, most frequent on top:
    what a confusion matrix of many classes no longer shows in numbers."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(7, max(2.5, 0.3 * len(pairs) + 1.2))
    ax = fig.add_subplot()
    if not pairs:
        ax.axis("off")
        ax.text(0.5, 0.5, "no mistakes: every image is right", ha="center", va="center")
        return fig
    labels = [f"{p['true']} -> {p['predicted']}" for p in pairs]
    bars = ax.barh(np.arange(len(pairs)), [p["count"] for p in pairs], color=WRONG, height=0.7)
    ax.bar_label(bars, padding=2, fontsize=8)
    ax.set_yticks(np.arange(len(pairs)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts of images
    ax.set(xlabel="images", title=f"The {len(pairs)} most confused pairs (true -> predicted)")
    return fig


def per_class_accuracy_figure(
    accuracy: Mapping[str, float],
    *,
    overall: float | None = None,
    tta: Mapping[str, float] | None = None,
    tta_label: str = "TTA",
) -> Figure:
    """Horizontal bars of accuracy per class, the overall accuracy as a line, TTA bars beside them.

    Beyond ``MANY_CLASSES`` classes: the ``BARS_AT_EACH_END`` best and worst classes, sorted best
    first, with a gap where the others would be.
    """
    names, title, left_out = list(accuracy), "Accuracy per class", 0
    if len(names) > MANY_CLASSES:
        k = BARS_AT_EACH_END
        ranked = sorted(names, key=lambda n: (-accuracy[n], n))  # the name breaks ties
        left_out = len(names) - 2 * k
        title += f": the {k} best and {k} worst of {len(names)} classes"
        names = ranked[:k] + ranked[-k:]
    y = np.arange(len(names), dtype=float)  # one row per bar, top down
    if left_out:
        y[BARS_AT_EACH_END:] += 1  # an empty row between the best and the worst
    fig = new_figure(7, max(3.0, 0.45 * (len(names) + bool(left_out)) + 1.5))
    ax = fig.add_subplot()
    if left_out:
        ax.text(
            1, BARS_AT_EACH_END, f"... {left_out} classes between", ha="left", va="center", fontsize=8, color="#555555"
        )
    height = 0.4 if tta else 0.7
    bars = ax.barh(y, [100 * accuracy[n] for n in names], height=height, color="#4c72b0", label="plain")
    ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    if tta:
        tta_bars = ax.barh(y + height, [100 * tta[n] for n in names], height=height, color="#dd8452", label=tta_label)
        ax.bar_label(tta_bars, fmt="%.1f", padding=2, fontsize=8)
    if overall is not None:
        ax.axvline(100 * overall, color="black", linestyle="--", linewidth=1, label=f"overall {100 * overall:.1f}%")
    ax.set_yticks(y + (height / 2 if tta else 0), names)
    ax.invert_yaxis()
    ax.set(xlim=(0, 108), xlabel="accuracy (%)", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def image_grid_figure(
    images: np.ndarray, titles: Sequence[str], colors: Sequence[str], *, ncols: int = 8, title: str = ""
) -> Figure:
    """uint8 images (N, H, W, 3) in a grid, each titled in its colour."""
    n = len(images)
    if n == 0:
        fig = new_figure(5, 2)
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no images to show", ha="center", va="center")
        fig.suptitle(title)
        return fig
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(max(1.6 * ncols, 5), 1.75 * nrows + (0.4 if title else 0))
    for k, ax in enumerate(fig.subplots(nrows, ncols, squeeze=False).flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k], interpolation="nearest")
            ax.set_title(titles[k], color=colors[k], fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def predictions_grid_figure(
    images: np.ndarray,
    labels: np.ndarray,
    preds: np.ndarray,
    class_names: Sequence[str],
    *,
    n: int = GRID_SIZE,
    seed: int = 0,
) -> Figure:
    """``n`` test images drawn at random (seeded), titled prediction over truth: green right, red wrong.

    A random draw rather than the first ``n``: image-folder test sets are sorted by class.
    """
    idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
    right = preds[idx] == labels[idx]
    titles = [f"{class_names[preds[i]]}\ntrue: {class_names[labels[i]]}" for i in idx]
    colors = [RIGHT if r else WRONG for r in right]
    return image_grid_figure(
        images[idx], titles, colors, title=f"Predictions (green right, red wrong): {right.sum()}/{len(idx)} right"
    )


def mistakes_figure(images: np.ndarray, mistakes: Sequence[Mapping[str, Any]]) -> Figure:
    """The most confident mistakes (``Evaluation.confident_mistakes``), with confidence and truth."""
    titles = [f"{m['predicted']} {100 * m['confidence']:.0f}%\ntrue: {m['true']}" for m in mistakes]
    picked = images[[m["index"] for m in mistakes]] if mistakes else images[:0]
    title = "Most confident mistakes" if mistakes else "Most confident mistakes: none, every image is right"
    return image_grid_figure(picked, titles, [WRONG] * len(mistakes), title=title)


# ---------------------------------------------------------------------------------------------
# Calibration and robustness
# ---------------------------------------------------------------------------------------------


def reliability_figure(calibration: Mapping[str, Any]) -> Figure:
    """Reliability diagrams before and after temperature scaling (``calibration.calibration_report``).

    Bars: accuracy per confidence bin; the diagonal is perfect calibration; red: the gap to it.
    """
    fig = new_figure(10, 4.6)
    for ax, when in zip(fig.subplots(1, 2), ("before", "after")):
        bins = calibration[f"reliability_{when}"]
        centres = [(b["low"] + b["high"]) / 2 for b in bins]
        width = bins[0]["high"] - bins[0]["low"]
        acc = [b["accuracy"] if b["count"] else 0 for b in bins]
        conf = [b["confidence"] if b["count"] else c for b, c in zip(bins, centres)]
        ax.bar(centres, acc, width=width * 0.95, color="#4c72b0", label="accuracy")
        ax.bar(
            centres,
            [c - a if b["count"] else 0 for b, a, c in zip(bins, acc, conf)],
            bottom=acc,
            width=width * 0.95,
            color=WRONG,
            alpha=0.35,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
        m = calibration[when]
        label = "before scaling" if when == "before" else f"after scaling (T = {calibration['temperature']:.2f})"
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="confidence (top-class probability)",
            ylabel="accuracy",
            title=f"{label}: ECE {100 * m['ece']:.2f}%, NLL {m['nll']:.3f}",
        )
        ax.legend(loc="upper left", fontsize=8)
    return fig


def corruptions_figure(report: Mapping[str, Any]) -> Figure:
    """Heat map of accuracy per corruption (rows) and severity (columns), clean accuracy beside it."""
    acc = report["accuracy"]  # corruption -> [accuracy at severity 1..5]
    names = list(acc)
    grid = np.array([acc[n] for n in names]) * 100  # (types, 5)
    fig = new_figure(8, 0.42 * len(names) + 2)
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_xticks(range(grid.shape[1]), [str(s) for s in report["severities"]])
    ax.set_yticks(range(len(names)), names)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8)
    ax.set(
        xlabel="severity",
        title=(
            f"Accuracy under corruption on {report['images']:,} test images: clean {100 * report['clean_accuracy']:.1f}%, "
            f"mean {100 * report['mean_accuracy']:.1f}% ({100 * report['relative_drop']:.1f}% lower)"
        ),
    )
    return fig


def corrupted_examples_figure(examples: Sequence[tuple[str, np.ndarray, str, str]], ncols: int = 5) -> Figure:
    """Corrupted images with what the model predicts: (title, uint8 image, prediction, truth)."""
    titles = [f"{t}\n{pred} (true: {true})" for t, _, pred, true in examples]
    colors = [RIGHT if pred == true else WRONG for _, _, pred, true in examples]
    images = np.stack([img for _, img, _, _ in examples]) if examples else np.zeros((0, 32, 32, 3), np.uint8)
    return image_grid_figure(images, titles, colors, ncols=ncols, title="Corrupted test images and predictions")


# ---------------------------------------------------------------------------------------------
# Training history from metrics.csv
# ---------------------------------------------------------------------------------------------

HISTORY_KEYS = ("train/loss", "val/loss", "train/acc", "val/acc")


def read_history(metrics_csv: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-epoch series ``name -> (epochs, values)`` from a Lightning CSVLogger ``metrics.csv``.

    The file has one sparse row per logging call. Epoch metrics (``train/loss``...) are keyed by
    their ``epoch`` (the last value wins when validation runs more than once per epoch). Learning
    rates (``lr-SGD``, ``lr-Adam``... whatever the optimizer) are logged with a step but no epoch,
    so each step is placed at its fractional epoch, from the last step of every epoch.
    """
    path = Path(metrics_csv)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    per_epoch: dict[str, dict[int, float]] = defaultdict(dict)
    last_step: dict[int, int] = {}
    lr_points: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        epoch, step = _number(row.get("epoch")), _number(row.get("step"))
        values = {k: v for k in HISTORY_KEYS if (v := _number(row.get(k))) is not None}
        if epoch is not None and values:
            per_epoch_index = int(epoch)
            for k, v in values.items():
                per_epoch[k][per_epoch_index] = v
            if step is not None:
                last_step[per_epoch_index] = max(int(step), last_step.get(per_epoch_index, -1))
        for k, v in row.items():
            if k and k.startswith("lr-") and (lr := _number(v)) is not None and step is not None:
                lr_points[k].append((int(step), lr))
    history = {k: (np.array(sorted(d)), np.array([d[e] for e in sorted(d)])) for k, d in per_epoch.items()}
    # Epoch e starts at step last_step[e - 1] + 1; np.interp maps any step between those marks.
    epochs = sorted(last_step)
    marks_step = [0] + [last_step[e] + 1 for e in epochs]
    marks_epoch = [0] + [e + 1 for e in epochs]
    for k, points in lr_points.items():
        steps, lrs = zip(*sorted(points))
        history[k] = (np.interp(steps, marks_step, marks_epoch), np.array(lrs))
    return history


def _number(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def history_figure(history: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "") -> Figure:
    """Loss, accuracy and learning rate against epoch (counted from 1, as the run's lines count
    them), train and validation side by side."""
    fig = new_figure(14, 4)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    from matplotlib.ticker import MaxNLocator

    for ax, metric, name, ylabel in ((ax_loss, "loss", "loss", "cross-entropy"), (ax_acc, "acc", "accuracy", "%")):
        for stage, style in (("train", "-o"), ("val", "-s")):
            if f"{stage}/{metric}" in history:
                x, v = history[f"{stage}/{metric}"]
                ax.plot(x + 1, 100 * v if metric == "acc" else v, style, markersize=3, label=stage)
        ax.set(xlabel="epoch", ylabel=ylabel, title=name)
    for k in sorted(k for k in history if k.startswith("lr-")):
        x, v = history[k]
        ax_lr.plot(x + 1, v, "-", marker="." if len(x) < 200 else None, label=k)
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    ax_lr.set_ylim(bottom=0)  # from zero, so a schedule's decay reads at its true scale
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        xs = np.concatenate([line.get_xdata() for line in ax.lines]) if ax.lines else np.array([])
        if len(xs) and xs.max() - xs.min() < 1:  # one epoch: a point in an epoch-wide axis, not ±0.05
            ax.set_xlim(xs.min() - 0.5, xs.max() + 0.5)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    return fig


def reference_curve_figure(
    runs: Mapping[str, tuple[np.ndarray, np.ndarray]], reference: Sequence[float], title: str
) -> Figure:
    """Validation accuracy per epoch of our runs (label -> (epochs, accuracy in [0, 1]), epochs from
    0) beside a reference's accuracy per epoch (in %, first epoch first)."""
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    ax.plot(
        np.arange(1, len(reference) + 1),
        reference,
        "-o",
        markersize=3,
        color="#555555",
        label="reference: test accuracy per epoch",
    )
    for label, (epochs, acc) in runs.items():
        ax.plot(epochs + 1, 100 * acc, "-s", markersize=3, label=label)
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_history(run: str | Path, output: str | Path | None = None) -> Path:
    """Write ``history.png`` for a run directory (or its ``metrics.csv``); returns the PNG path."""
    run = Path(run)
    csv_path = run if run.is_file() else run / "metrics.csv"
    if not csv_path.is_file():
        raise UserError(
            f"no metrics.csv at {csv_path}. Pass a run directory written by scripts/fit.py "
            "(runs/<arch>/version_N/) or its metrics.csv."
        )
    history = read_history(csv_path)
    if not any(k in history for k in HISTORY_KEYS):
        raise UserError(f"{csv_path} holds no per-epoch train/ or val/ metrics to plot.")
    out = Path(output) if output else csv_path.parent / "history.png"
    return save_figure(history_figure(history, title=str(csv_path.parent)), out)


@exit_on_user_error
def plot_history_main(argv: list[str] | None = None) -> Path:
    """``scripts/plot_history.py RUN_DIR [--output PNG]``."""
    parser = argparse.ArgumentParser(
        prog="scripts/plot_history.py", description="Plot loss, accuracy and learning rate per epoch of a run."
    )
    parser.add_argument("run_dir", help="runs/<arch>/version_N/ (or its metrics.csv)")
    parser.add_argument("--output", help="PNG path (default: <run dir>/history.png)")
    args = parser.parse_args(argv)
    path = plot_history(args.run_dir, args.output)
    print(f"history: {path}")
    return path
