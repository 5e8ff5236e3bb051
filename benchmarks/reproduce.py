"""Run recipes over seeds and tabulate the results next to their published references.

Each run is a ``python -m cifar_lightning.fit --config <recipe> --seed <s>`` subprocess. Its full
log (one line per epoch), its ``metrics.csv`` and its ``test_report.json`` are kept under
``<results>/``, so that every number in the table can be traced to the run that produced it.
Every row says how it stands: measured (mean ± std over seeds, hardware, data copy),
smoke-checked only (``recipe_check``: a short run on real images that must learn), or not run.
Nothing is estimated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch

from benchmarks import REPO
from cifar_lightning.errors import UserError, exit_on_user_error
from cifar_lightning.report import write_report


def recipe_header(path: Path) -> dict[str, str]:
    """The ``# key: value`` fields of a recipe's header comment (source, reference, epochs, time)."""
    fields: dict[str, str] = {}
    key = None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*(\w+):\s*(.*)", line)
        if m:
            key = m.group(1)
            fields[key] = m.group(2).strip()
        elif key and line.startswith("#   "):
            fields[key] += " " + line[1:].strip()
    return fields


def hardware() -> dict[str, str]:
    """The machine the runs used: its CPU, and its GPU(s) when training ran on them."""
    cpu = f"{platform.machine()} x{os.cpu_count()} cores"
    gpu = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() else "-"
    return {"cpu": cpu, "gpu": gpu}


def restamp(results: Path) -> list[Path]:
    """Name every absolute path in the kept logs and reports of ``results`` by its role
    (``provenance.scrub_paths``), for runs made before results recorded their provenance. The
    numbers are untouched; each report says it was restamped, when, and at which commit."""
    from benchmarks.provenance import command_line, git_state, scrub, scrub_paths

    changed = []
    for path in sorted(results.glob("*-seed*.log")) + sorted(results.glob("*-seed*.json")):
        text = path.read_text()
        if path.suffix == ".log":
            new = scrub_paths(text)
        else:
            report = json.loads(text)
            new_report = scrub(report)
            if new_report != report and "provenance" not in report:
                new_report["provenance"] = {
                    "recorded": False,
                    "restamped": {
                        "commit": git_state()["commit"],
                        "date": date.today().isoformat(),
                        "command": command_line(),
                    },
                    "note": "run made before results recorded their commit and machine; its absolute paths "
                    "were named by role by this command, its numbers are as the run wrote them",
                }
            new = json.dumps(new_report, indent=2, ensure_ascii=False) + "\n"
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def data_label(data_dir: str) -> str:
    """Which copy of CIFAR-10 a run read, as the table states it."""
    name = Path(data_dir).name
    if "jpeg" in name.lower():
        return f"JPEG q75 copy ({name})"
    return name


def run_recipe(
    recipe: Path, seed: int, data_dir: str, results: Path, extra: list[str], keep_checkpoint: bool = False
) -> dict:
    """Run one recipe with one seed; keep its log and report under ``results``; return the report.

    The run's folder (``results/runs/<recipe>-seed<seed>``, checkpoints included) is removed at the
    end, so that several invocations can run side by side; with ``keep_checkpoint`` the tested
    checkpoint is kept first, as ``results/<recipe>-seed<seed>.ckpt`` (not tracked by git: the
    weights that are shipped are made from it by ``scripts/publish_weights.py``).
    """
    from benchmarks.provenance import finish, provenance, scrub, scrub_paths

    tag = f"{recipe.stem}-seed{seed}"
    results.mkdir(parents=True, exist_ok=True)
    log = results / f"{tag}.log"
    cmd = [
        sys.executable,
        "-m",
        "cifar_lightning.fit",
        "--config",
        str(recipe),
        "--seed",
        str(seed),
        "--data-dir",
        data_dir,
        "--output-dir",
        str(results / "runs"),
        "--name",
        tag,
        *extra,
    ]
    prov = provenance(data_dir)
    # The log is kept in the repository: every path in it is named by its role as it is written.
    with (
        open(log, "w") as f,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc,
    ):
        f.write("$ " + shlex.join(["python", *(scrub_paths(c) for c in cmd[1:])]) + "\n")
        for line in proc.stdout:
            f.write(scrub_paths(line))
            f.flush()
    if proc.returncode != 0:
        raise UserError(f"{tag} failed (exit {proc.returncode}); see {log}")
    report_path = max((results / "runs" / tag).glob("version_*/test_report.json"), key=lambda p: p.stat().st_mtime)
    report = json.loads(report_path.read_text())
    # The per-epoch curves stay beside the log; the run folder (checkpoints) is dropped later.
    shutil.copyfile(report_path.parent / "metrics.csv", results / f"{tag}-metrics.csv")
    if keep_checkpoint and report.get("checkpoint"):
        shutil.copyfile(report["checkpoint"], results / f"{tag}.ckpt")
    shutil.rmtree(results / "runs" / tag, ignore_errors=True)
    with contextlib.suppress(OSError):  # left while another invocation's run is in it
        (results / "runs").rmdir()
    report.update(
        recipe=recipe.stem,
        seed=seed,
        hardware=hardware(),
        data=data_label(data_dir),
        date=date.today().isoformat(),
        extra_args=extra,
    )
    report = scrub(report) | {"provenance": finish(prov)}
    write_report(report, results / f"{tag}.json")
    return report


_EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+  train loss .*  ([\d.]+) s  eta ", re.M)


def run_parts(results: Path, recipe: str, seed: int) -> list[dict[str, Any]]:
    """The parts of a run resumed with ``--resume``, in order: each kept log (``<recipe>-seed<N>-part<K>.log``,
    then ``<recipe>-seed<N>.log``, the part that finished) with the epochs it trained and their seconds,
    read from its per-epoch lines. Empty for a run without part logs: its report's time is the whole fit."""
    tag = f"{recipe}-seed{seed}"
    logs = sorted(results.glob(f"{tag}-part*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem.rsplit("-part", 1)[1])))
    if not logs:
        return []
    parts = []
    for log in [*logs, results / f"{tag}.log"]:
        epochs = {int(n): float(s) for n, s in _EPOCH_LINE.findall(log.read_text())}
        if not epochs:
            raise UserError(f"{log} holds no epoch lines: a part of {tag} that trained nothing.")
        parts.append({"log": log.name, "epochs": [min(epochs), max(epochs)], "seconds": round(sum(epochs.values()), 1)})
    trained = [e for p in parts for e in range(p["epochs"][0], p["epochs"][1] + 1)]
    if trained != list(range(1, len(trained) + 1)):
        raise UserError(f"the parts of {tag} do not train epochs 1, 2, ... once each: {[p['epochs'] for p in parts]}")
    return parts


def fit_seconds(report: dict[str, Any], parts: list[dict[str, Any]]) -> float:
    """A run's training time: its report's, or, for a resumed run, the sum of its parts' epochs."""
    return round(sum(p["seconds"] for p in parts), 1) if parts else report["fit_seconds"]


def _hardware_cells(report: dict[str, Any]) -> tuple[str, str]:
    hw = report["hardware"]
    if isinstance(hw, dict):
        return hw["cpu"], hw["gpu"]
    return hw.removeprefix("CPU ").strip(), "-"  # reports written before the GPU column


def table(recipes: list[Path], results: Path, smoke: dict[str, dict[str, Any]] | None = None) -> str:
    """Markdown table over every recipe: measured rows from ``results``, smoke-checked ones from
    ``smoke`` (recipe name -> ``recipe_check`` row), the rest marked not run."""
    rows = [
        "| recipe | status | reference (source) | ours: test acc, mean ± std (seeds) | epochs | wall time / run "
        "| hardware | GPU | data | extra args / notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for recipe in recipes:
        head = recipe_header(recipe)
        reports = [json.loads(p.read_text()) for p in sorted(results.glob(f"{recipe.stem}-seed*.json"))]
        ref = head.get("reference", "-")
        if not reports:
            check = (smoke or {}).get(recipe.stem)
            if check and check.get("kind") == "overfit":  # too slow a start to learn within a smoke run
                status = (
                    f"smoke-checked only (one batch learnt, data run falls): {check['batch_steps']} steps on one "
                    f"batch to loss {check['batch_loss']:.2f}, eval accuracy {100 * check['batch_acc']:.0f}%; "
                    f"{check['steps']} data steps, loss {check['early_loss']:.2f} to {check['late_loss']:.2f}"
                )
            elif check:
                status = (
                    f"smoke-checked only: {check['steps']} steps, training loss {check['late_loss']:.2f} "
                    f"(chance 2.30), validation accuracy {100 * check['val_acc']:.1f}% on 512 images"
                )
            else:
                status = "not run"
            if check and not check.get("passed", False):
                status = "smoke check FAILED: " + status.removeprefix("smoke-checked only")
            rows.append(f"| {recipe.stem} | {status} | {ref} | - | {head.get('epochs', '-')} | - | - | - | - | - |")
            continue
        accs = [100 * r["test_acc"] for r in reports]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        parts = {r["seed"]: run_parts(results, recipe.stem, r["seed"]) for r in reports}
        secs = statistics.mean(fit_seconds(r, parts[r["seed"]]) + r["test_seconds"] for r in reports)
        resumed = [f"seed {s}: {len(p)} resumed parts, their epochs' times summed" for s, p in parts.items() if p]
        notes = [" ".join(reports[0].get("extra_args", [])), reports[0].get("note"), *resumed]
        extra = "; ".join(filter(None, notes)) or "-"
        cpu, gpu = _hardware_cells(reports[0])
        rows.append(
            f"| {recipe.stem} | measured, {len(accs)} seed(s) | {ref} | {statistics.mean(accs):.2f}%{spread} ({len(accs)}) "
            f"| {reports[0]['epochs']} | {secs / 60:.1f} min | {cpu} | {gpu} | {reports[0]['data']} | {extra} |"
        )
    return "\n".join(rows) + "\n"


def resolve_recipe(recipe: Path, configs: Path = REPO / "configs") -> Path:
    """A recipe file: ``recipe`` itself when it exists, else ``configs/<recipe>.yaml`` (a recipe's name)."""
    if recipe.is_file():
        return recipe
    named = configs / (recipe.name if recipe.suffix == ".yaml" else f"{recipe.name}.yaml")
    if recipe.parent == Path(".") and named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in configs.glob("*.yaml")))
    raise UserError(f"no recipe {str(recipe)!r}: not a file, and not a recipe name in {configs}/ ({known}).")


def reference_curve(head: dict[str, str]) -> list[float]:
    """The per-epoch reference accuracies (%) of a recipe header's ``reference_curve`` field."""
    text = head.get("reference_curve", "").split("(")[0]
    return [float(v) for v in re.findall(r"\d+(?:\.\d+)?", text)]


def draw_reference_curves(recipes: list[Path], results: Path) -> list[Path]:
    """``<recipe>-curve.png`` for each recipe with a ``reference_curve`` and kept ``metrics.csv`` files:
    our validation accuracy per epoch, one line per seed, beside the reference's test accuracy."""
    from cifar_lightning.plots import read_history, reference_curve_figure, save_figure

    written = []
    for recipe in recipes:
        curve = reference_curve(recipe_header(recipe))
        csvs = sorted(results.glob(f"{recipe.stem}-seed*-metrics.csv"))
        if not curve or not csvs:
            continue
        runs = {}
        for csv_path in csvs:
            history = read_history(csv_path)
            if "val/acc" in history:
                runs[f"ours, {csv_path.stem.removesuffix('-metrics').split('-')[-1]}: validation accuracy"] = history[
                    "val/acc"
                ]
        fig = reference_curve_figure(runs, curve, f"{recipe.stem}: ours (JPEG copy) and the reference")
        written.append(save_figure(fig, results / f"{recipe.stem}-curve.png"))
    return written


def jpeg_note(path: Path) -> str:
    """What the JPEG copy costs, as far as it was measured: airbench94's own code on the copy (from
    the committed time-to-accuracy results) beside its published figure on the original images."""
    if not path.is_file():
        return "How much the JPEG copy costs was not measured: the original images are not on these machines."
    results = json.loads(path.read_text())
    # Results made before the section took its full name (up to commit 6b9c349) call it "tta".
    section = results.get("time_to_accuracy") or results.get("tta") or {}
    runs = [r for r in section.get("runs", []) if r["runner"] == "airbench94"]
    if not runs:
        return "How much the JPEG copy costs was not measured: the original images are not on these machines."
    acc = statistics.mean(100 * r["test_acc"] for r in runs)
    return (
        f"On the copy, airbench94's own code reached {acc:.2f}% ({len(runs)} seed(s), CPU, fp32; "
        f"`{path.name}`) where its authors publish 94.01% on the original images (A100, fp16, mean of many "
        "runs). Copy, precision and hardware all differ between those two figures, so their gap is not "
        "the JPEG penalty alone; that penalty cannot be measured here, where the original images are absent."
    )


def read_smoke(path: Path) -> dict[str, dict[str, Any]]:
    """``recipe_check`` results by recipe name, from the JSON that ``scripts/check_recipes.py`` writes."""
    if not path.is_file():
        return {}
    return {row["recipe"]: row for row in json.loads(path.read_text())["results"]}


@exit_on_user_error
def main(argv: list[str] | None = None) -> str:
    """``scripts/reproduce.py``: run recipes over seeds, then write the markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "recipes",
        nargs="*",
        type=Path,
        help="recipe files or names in --configs (mynet_tutorial); none: only rebuild the table",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--configs", type=Path, default=REPO / "configs", help="the recipes folder (default: this clone's)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "reproduce")
    p.add_argument("--table", type=Path, default=REPO / "benchmarks" / "reproduce.md")
    p.add_argument(
        "--smoke",
        type=Path,
        default=REPO / "benchmarks" / "recipe_smoke.json",
        help="smoke-check results (scripts/check_recipes.py) for rows without a measured run",
    )
    p.add_argument("--note", default=None, help="a remark stored with each run, e.g. that the machine was shared")
    p.add_argument(
        "--restamp",
        action="store_true",
        help="name the absolute paths in the kept logs and reports by role (runs made before "
        "results recorded their provenance), then rebuild the table",
    )
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each run's tested checkpoint as <results>/<recipe>-seed<N>.ckpt (git-ignored)",
    )
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more fit.py arguments for every run")
    args = p.parse_args(argv)
    if args.restamp:
        for path in restamp(args.results):
            print(f"restamped {path}")
    args.recipes = [resolve_recipe(r, args.configs) for r in args.recipes]
    for recipe in args.recipes:
        for seed in args.seeds:
            report = run_recipe(recipe, seed, args.data_dir, args.results, args.extra, args.keep_checkpoints)
            if args.note:
                report["note"] = args.note
                write_report(report, args.results / f"{recipe.stem}-seed{seed}.json")
    recipes = {r.stem: r for r in [*sorted(args.configs.glob("*.yaml")), *args.recipes]}
    text = table(list(recipes.values()), args.results, read_smoke(args.smoke))
    draw_reference_curves(list(recipes.values()), args.results)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    from benchmarks.provenance import command_line, describe_path, git_state

    args.table.write_text(
        f"# Reproduction table\n\nGenerated by `{command_line()}` at commit `{(git_state()['commit'] or '?')[:12]}` "
        f"on {date.today().isoformat()} from the logs and reports in `{describe_path(args.results)}/` (each report "
        f"holds its run's provenance) and the smoke checks in `{describe_path(args.smoke)}`. "
        "References are for the original images of each recipe's dataset (CIFAR-10, or CIFAR-100 for the `_cifar100` recipes); rows marked JPEG used the quality-75 JPEG copy. "
        + jpeg_note(args.results.parent / "time_to_accuracy_cpu.json")
        + " Status: measured (a full run of the recipe), smoke-checked only (a short run on the real images, "
        "see `benchmarks/recipe_smoke.md` for what each kind of check shows), or not run. Nothing is "
        "estimated.\n\n" + text
    )
    print(text)
    return text
