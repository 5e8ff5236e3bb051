"""The one report format of a tested model, its JSON file and its printed table.

``scripts/fit.py`` (``test_report.json``) and ``scripts/evaluate.py`` (``report.json``) both build
their report here, so the same numbers have the same keys everywhere:

- ``arch``, ``checkpoint``, ``class_names``;
- ``test_acc``, ``test_loss``, ``per_class_acc`` (class name -> accuracy), ``test_images``;
- where they apply: ``test_acc_top5`` (more than 10 classes) and ``test_acc_superclass`` (a
  checkpoint whose classes are grouped, as CIFAR-100's 20 superclasses: a prediction counts when
  it falls in the true class's group).

The JSON keeps every class; the printed table lists them all up to ``MANY_CLASSES`` classes, and
beyond that the ``SHOWN_AT_EACH_END`` worst and best.

Each adds its own keys beside them: fit.py its timings and image counts, evaluate.py precision,
recall, the confusion matrix, TTA, calibration and corruption results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.table import Table

#: Beyond this many classes the table prints the worst and best classes only, and the figures
#: switch to their compact forms (``plots``): 100 rows or a 100 x 100 grid of numbers read as noise.
MANY_CLASSES = 20
#: Classes printed at each end (worst, best) of the table beyond ``MANY_CLASSES``.
SHOWN_AT_EACH_END = 5


def build_report(
    *,
    arch: str,
    class_names: Sequence[str],
    test_acc: float,
    test_loss: float,
    per_class_acc: Mapping[str, float],
    test_images: int,
    checkpoint: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """The report dict: the shared keys first, then ``extra``."""
    return {
        "arch": arch,
        "checkpoint": checkpoint,
        "class_names": list(class_names),
        "test_acc": float(test_acc),
        "test_loss": float(test_loss),
        "per_class_acc": {name: float(per_class_acc[name]) for name in class_names if name in per_class_acc},
        "test_images": int(test_images),
        **extra,
    }


def to_json(data: Any) -> str:
    """Indented JSON that keeps non-ASCII text readable (``ü``, not ``\\u00fc``), with a final newline."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_report(report: Any, path: str | Path) -> Path:
    """Write ``report`` as indented UTF-8 JSON (``to_json``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(report), encoding="utf-8")
    return path


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def table_classes(per_class_acc: Mapping[str, float]) -> list[str | None]:
    """The classes the printed table lists, in its order: all of them in label order, or, beyond
    ``MANY_CLASSES``, the ``SHOWN_AT_EACH_END`` worst then the best by accuracy, lowest first,
    with None standing for the classes between."""
    names = list(per_class_acc)
    if len(names) <= MANY_CLASSES:
        return names
    ranked = sorted(names, key=lambda n: (per_class_acc[n], n))  # the name breaks ties, so runs agree
    k = SHOWN_AT_EACH_END
    return [*ranked[:k], None, *ranked[-k:]]


def print_report(report: Mapping[str, Any], console: Console | None = None) -> None:
    """Per-class table (accuracy; precision, recall and images when measured; TTA accuracy when
    asked for), then the notes that go with it: loss, subsets, confusions, checkpoint, times."""
    console = console or Console()
    detail = report.get("per_class") or {}
    tta = report.get("tta")
    # The title is a line of its own: as a table's title, rich wraps it to the table's width.
    seen, total = report.get("test_images_seen"), report["test_images"]
    subset = f"{seen:,} of {total:,} test images" if seen is not None and seen < total else f"{total:,} test images"
    console.print(f"[bold]Test results: {report['arch']} on {subset}[/bold]", soft_wrap=True)
    table = Table()
    columns = (
        ["class", "accuracy"]
        + (["precision", "recall", "images"] if detail else [])
        + (["TTA accuracy"] if tta else [])
    )
    for name in columns:
        table.add_column(name, justify="left" if name == "class" else "right")
    per_class = report["per_class_acc"]
    shown = table_classes(per_class)
    if None in shown:
        console.print(
            f"the {SHOWN_AT_EACH_END} worst and {SHOWN_AT_EACH_END} best of {len(per_class)} classes by accuracy "
            "(the JSON report has every class)",
            soft_wrap=True,
        )
    for name in shown:
        if name is None:
            between = len(per_class) - len(shown) + 1
            table.add_row(f"[dim]... {between} classes between[/dim]", *[""] * (len(columns) - 1))
            continue
        row = [name, _pct(per_class[name])]
        if detail:
            d = detail[name]
            row += [_pct(d["precision"]), _pct(d["recall"]), str(d["support"])]
        table.add_row(*row, *([_pct(tta["per_class_acc"][name])] if tta else []))
    table.add_section()
    overall = ["[bold]overall[/bold]", f"[bold]{_pct(report['test_acc'])}[/bold]"]
    if detail:
        overall += [_pct(report["macro_precision"]), _pct(report["macro_recall"]), str(report["test_images"])]
    table.add_row(*overall, *([_pct(tta["test_acc"])] if tta else []))
    console.print(table)
    # soft_wrap: a long line (a path) stays whole in a log file, where rich would break it at 80 columns.
    gain = f"; TTA ({tta['mode']}) changes accuracy by {100 * tta['gain']:+.2f} points" if tta else ""
    console.print(f"test loss {report['test_loss']:.4f}{gain}", soft_wrap=True)
    if "test_acc_top5" in report or "test_acc_superclass" in report:
        console.print(_more_accuracies(report), soft_wrap=True)
    for stage, name in (("train", "training (last epoch)"), ("test", "test"), ("val", "validation (last epoch)")):
        seen, total = report.get(f"{stage}_images_seen"), report.get(f"{stage}_images")
        if seen is not None and total and seen < total:
            console.print(f"{name} on {seen:,} of {total:,} images: a subset, not the whole split", soft_wrap=True)
    if report.get("confused_pairs"):
        top = ", ".join(f"{p['true']}->{p['predicted']} ({p['count']})" for p in report["confused_pairs"][:5])
        console.print(f"most confused (true->predicted): {top}", soft_wrap=True)
    if "calibration" in report:
        cal = report["calibration"]
        before, after = cal["before"], cal["after"]
        console.print(
            f"calibration (temperature {cal['temperature']:.3f}, fitted on the {cal['fitted_on']}): "
            f"ECE {_pct(before['ece'])} -> {_pct(after['ece'])}, NLL {before['nll']:.4f} -> {after['nll']:.4f}, "
            f"Brier {before['brier']:.4f} -> {after['brier']:.4f}",
            soft_wrap=True,
        )
    if "corruptions" in report:
        cor = report["corruptions"]
        worst = min(cor["mean_by_corruption"], key=cor["mean_by_corruption"].get)
        console.print(
            f"corruptions ({len(cor['accuracy'])} types x {len(cor['severities'])} severities, {cor['images']:,} test "
            f"images): mean accuracy {_pct(cor['mean_accuracy'])} against {_pct(cor['clean_accuracy'])} clean "
            f"({_pct(cor['relative_drop'])} lower); worst: {worst} {_pct(cor['mean_by_corruption'][worst])}",
            soft_wrap=True,
        )
    console.print(f"checkpoint: {report['checkpoint'] or '(none saved)'}", soft_wrap=True)
    if "fit_seconds" in report:
        console.print(f"time: fit {report['fit_seconds']:.1f} s, test {report['test_seconds']:.1f} s")
    elif "seconds" in report:
        console.print(f"time: {report['seconds']:.1f} s")


def _more_accuracies(report: Mapping[str, Any]) -> str:
    """The top-5 and superclass accuracy line, with TTA's beside them and the worst superclass."""
    tta = report.get("tta") or {}
    parts = []
    for key, name in (("test_acc_top5", "top-5 accuracy"), ("test_acc_superclass", "superclass accuracy")):
        if key in report:
            parts.append(f"{name} {_pct(report[key])}" + (f" (TTA {_pct(tta[key])})" if key in tta else ""))
    groups = report.get("per_superclass_acc") or {}
    if groups:
        worst = min(groups, key=lambda g: (groups[g], g))
        parts.append(f"{len(groups)} superclasses, worst {worst} {_pct(groups[worst])}")
    return "; ".join(parts)
