"""The GPU command's figures: statistics over seeds, comparisons with a baseline, and the headline
lines printed at the end."""

from __future__ import annotations

import statistics
from typing import Any


def stats(values: list[float], digits: int = 5) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value) and count."""
    return {
        "mean": round(statistics.fmean(values), digits) if values else None,
        "std": round(statistics.stdev(values), digits) if len(values) > 1 else None,
        "n": len(values),
    }


def compare(runs: dict[str, list[dict[str, Any]]], baseline: str | None) -> dict[str, Any]:
    """Per system: TTA accuracy, training and wall seconds (mean, std, n); ratios to ``baseline``."""
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        out[name] = {
            key: stats([r[key] for r in rs if r.get(key) is not None], digits)
            for key, digits in (("tta_acc", 5), ("train_seconds", 3), ("wall_seconds", 2))
        }
    base = out.get(baseline)
    for name, s in out.items():
        if name == baseline or not base or not base["train_seconds"]["mean"] or s["train_seconds"]["mean"] is None:
            continue
        s["time_ratio_to_baseline"] = round(s["train_seconds"]["mean"] / base["train_seconds"]["mean"], 3)
        s["acc_diff_points_vs_baseline"] = round(100 * (s["tta_acc"]["mean"] - base["tta_acc"]["mean"]), 3)
    return out


def headline(results: dict[str, Any]) -> list[str]:
    """One line per measurement of a section's results (adds ``summary`` to side-by-side ones)."""
    lines = []
    if results.get("runs"):
        results["summary"] = compare(results["runs"], results.get("baseline"))
        for name, s in results["summary"].items():
            acc, secs = s["tta_acc"], s["train_seconds"]
            if acc["mean"] is None:
                continue
            spread = f" +- {100 * acc['std']:.2f}" if acc["std"] is not None else ""
            line = f"{name}: {100 * acc['mean']:.2f}{spread}% (TTA), {acc['n']} seed(s)"
            line += f", {secs['mean']:.2f} s of training" if secs["mean"] is not None else ""
            if "time_ratio_to_baseline" in s:
                line += f"; x{s['time_ratio_to_baseline']:.2f} {results['baseline']}'s time, "
                line += f"{s['acc_diff_points_vs_baseline']:+.2f} points"
            lines.append(line)
    if "pytest" in results:
        t = results["pytest"]
        counts = f"{t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('skipped', 0)} skipped"
        lines.append(
            f"pytest -m gpu: {counts}" if "tests" in t else f"pytest -m gpu: no report (exit {t['exit_code']})"
        )
    if "compile" in results:
        c = results["compile"]
        why = c.get("skipped") or c.get("error")
        lines.append(
            f"--model.compile {'true' if c.get('pays') else 'false'}"
            + (
                f" ({why})"
                if why
                else f": a step {c['eager_step_seconds']} s eager, {c['compiled_step_seconds']} s compiled, the "
                f"first compiled one {c['first_compiled_step_seconds']} s"
            )
        )
    if "networks" in results:
        nets = results["networks"]
        compiled = sum(r["status"] == "compiled" for r in nets.values())
        failed = [n for n, r in nets.items() if r["status"] == "failed"]
        missed = results.get("not_reached")
        lines.append(
            f"compile sweep ({results['backend']}): {compiled} of {len(results['order'])} networks compiled"
            + (f", failed: {', '.join(failed)}" if failed else "")
            + (f", not reached: {', '.join(missed)}" if missed else "")
        )
    if "overhead" in results:
        o = results["overhead"]
        lines.append(
            f"overhead: Trainer.fit / bare loop {o['ratio']:.3f} ({o['arch']}, batch {o['batch_size']}, "
            f"{o['device']}; target >= {o['target_ratio']})"
        )
    if "data" in results:
        d, w = results["data"], results.get("data_all_cores")
        line = (
            f"data: tensor loader {d['tensor_loader']['images_per_s']:,.0f} img/s ({d['device']}), "
            f"x{d['speedup']:.1f} ImageFolder+PIL with 2 workers"
        )
        lines.append(line + (f", x{w['speedup']:.1f} with {w['workers']} workers" if w else ""))
    for name in ("resnet20_paper", "resnet34_tutorial", "mynet_tutorial"):
        if name in results and "test_acc" in results[name]:
            r = results[name]
            lines.append(f"{name}: {100 * r['test_acc']:.2f}% test accuracy, {r['fit_seconds']:,.1f} s of fit")
    for name in ("airbench94", "airbench95"):
        if isinstance(results.get(name), dict) and results[name].get("status") == "skipped":
            lines.append(f"{name}: skipped, {results[name]['reason']}")
    return lines


# ---------------------------------------------------------------------------------------------
# The runner: budget, one process per section, the files
# ---------------------------------------------------------------------------------------------
