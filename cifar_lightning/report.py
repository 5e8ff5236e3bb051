"""The end-of-run report: overall and per-class test accuracy, checkpoint and timings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from rich.console import Console
from rich.table import Table


def build_report(
    metrics: Mapping[str, float],
    class_names: list[str],
    *,
    arch: str,
    checkpoint: str | None,
    fit_seconds: float,
    test_seconds: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect the test metrics logged under ``test/...`` into a JSON-ready dict."""
    per_class = {name: float(metrics[f"test/acc/{name}"]) for name in class_names if f"test/acc/{name}" in metrics}
    return {
        "arch": arch,
        "test_acc": float(metrics["test/acc"]),
        "test_loss": float(metrics["test/loss"]),
        "per_class_acc": per_class,
        "checkpoint": checkpoint,
        "fit_seconds": round(fit_seconds, 2),
        "test_seconds": round(test_seconds, 2),
        **dict(extra or {}),
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


def print_report(report: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the report as a rich table."""
    console = console or Console()
    table = Table(title=f"Test results: {report['arch']}", show_footer=False)
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in report["per_class_acc"].items():
        table.add_row(name, f"{100 * acc:.2f}%")
    table.add_section()
    table.add_row("[bold]overall[/bold]", f"[bold]{100 * report['test_acc']:.2f}%[/bold]")
    console.print(table)
    for stage, name in (("test", "test"), ("val", "validation (last epoch)")):
        seen, total = report.get(f"{stage}_images_seen"), report.get(f"{stage}_images")
        if seen is not None and total and seen < total:
            console.print(f"{name} on {seen:,} of {total:,} images: a subset, not the whole split", soft_wrap=True)
    # soft_wrap: a path stays on one line in a log file, where rich would break it at 80 columns.
    console.print(f"checkpoint: {report['checkpoint'] or '(none saved)'}", soft_wrap=True)
    console.print(f"time: fit {report['fit_seconds']:.1f} s, test {report['test_seconds']:.1f} s")
