"""One command for a short GPU window: every measurement the project still owes a GPU, in order of
priority, within a time budget.

``python scripts/gpu_evidence.py --data-dir DIR --output-dir OUT --budget SECONDS [--skip-done DIR]
[--quick]``. Each section runs in its own process (``python -m benchmarks.gpu_evidence
--section NAME ...``, the code in ``gpu_sections``) under a time cap, and its JSON is written the
moment it ends; a section that fails or runs out of time is recorded with its error, exit code
and last lines of output, and the next one runs.

0. ``gpu_tests``: ``pytest -m gpu``, the CUDA paths tested before they are measured.
1. ``airbench``: airbench94 (the ``airbench`` package, 0.1.8) beside ``configs/fastnet.yaml`` and
   ``configs/fastnet_muon.yaml`` through our CLI, all on the same images, seeds alternating (2 to
   5, as the time allows): TTA test accuracy, and training seconds counted as airbench counts
   them (training steps only), our time over airbench's and the accuracy difference.
2. ``overhead_data``: the bench ``overhead`` section (fastnet, batch 1024) and ``data`` section,
   and the per-image torchvision loaders again with every core as a worker.
3. ``resnet18_fast``: ``configs/resnet18_fast.yaml`` beside airbench95.
4. ``recipes``: ``configs/resnet34_tutorial.yaml`` and ``configs/mynet_tutorial.yaml`` as written,
   then one seed of ``configs/resnet20_paper.yaml``'s 64k iterations where it fits.
5. ``ablation``: resnet18 on a short schedule with each training trick, 2 seeds (``gpu_ablation``).

Before a section its cost (``COSTS``) is compared with the budget left: it is skipped, and says
so, when its minimum does not fit. It then aims to finish within its estimate, less what the later
sections' minimums need, and is stopped at its cap. ``--skip-done DIR`` skips the sections whose
JSON in DIR has status "ok". OUT receives at most 8 files, flat: ``NN_<section>.json``,
``summary.json`` and ``gpu_evidence.log`` (everything printed). Fits write into temporary folders
that are deleted; no checkpoint is kept. ``--quick`` runs every section end to end on the CPU
with a tiny synthetic image folder (airbench's runs are then skipped: they need CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import REPO, child_env

LOG_NAME, SUMMARY_NAME = "gpu_evidence.log", "summary.json"
TAIL_LINES = 40


@dataclass(frozen=True)
class Cost:
    """Seconds a section takes on one H100 (bf16, channels-last, tensor loader on the GPU), its
    process's start (imports, CUDA) included. ``minimum``: its least useful run (the budget check);
    ``estimate``: its whole plan; ``cap``: the limit of its process."""

    minimum: float
    estimate: float
    cap: float


#: Estimated from public figures, not yet from a run of ours on an H100 (see benchmarks/README.md).
#: Process start ~10 s; warm-ups: cuDNN autotuning ~5-10 s, a cold torch.compile 20-40 s.
COSTS: dict[str, Cost] = {
    # every network's fast_dev_run compiled through AOT autograd (~5-10 s each), fastnet through
    # inductor (~60 s), the loaders, Muon, evaluate/predict/export: ~5 min.
    "gpu_tests": Cost(120, 300, 420),
    # cifar10/*.pt ~3 s, warmup94 ~10 s, our two warm-up fits ~10 s; a round of seeds ~18 s
    # (airbench94 3.5 s on an A100 plus its per-epoch evaluation; fastnet ~8 s and fastnet_muon
    # ~6 s with the CLI's set-up and the TTA test); the compile check ~45 s. Minimum: 2 rounds;
    # estimate: 4 rounds and the compile check (5 when the check is skipped or fast).
    "airbench": Cost(75, 150, 240),
    # 3 fits of 24 steps (fastnet, batch 1024, fp32) each paired with a bare loop ~15 s; the
    # loaders ~15 s (the PIL ones read a few thousand images each).
    "overhead_data": Cost(45, 45, 120),
    # warmup95 ~12 s, a warm-up fit ~8 s, airbench95 ~11 s a seed (10.4 s on an A100), our
    # 18 epochs of ResNet-18 (3.3 GFLOP a training image) at ~4-5 s an epoch, with the TTA test
    # ~85 s. Minimum: one seed of each; estimate: 3 seeds of airbench95.
    "resnet18_fast": Cost(115, 135, 300),
    # resnet34_tutorial: 20 epochs of 45k at 7 GFLOP a training image, with validation, ~80 s;
    # mynet_tutorial ~20 s; then resnet20_paper where it fits: 64,000 steps of 128 images at ~5 ms
    # (ResNet-20 is too small to fill an H100: the framework's per-step cost dominates) and 182
    # validations, ~7 min.
    "recipes": Cost(110, 530, 600),
    # 11 variants of resnet18_fast cut to 4 epochs of 50k (~20 s each with the TTA test, SAM ~35 s)
    # and a warm-up fit ~8 s: a round of seeds ~250 s. Minimum: the baseline and one trick.
    "ablation": Cost(60, 520, 600),
}

#: --quick: every section is a few CPU seconds after its ~5 s of imports.
QUICK_COST = Cost(5, 30, 300)

SECTIONS = tuple(COSTS)


class Log:
    """Prints a line and appends it to the log file (safe from the thread reading a section)."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8")
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def machine() -> dict[str, Any]:
    """Hardware and versions (the GPU by torch.cuda, the CPU, every library the runs use), and the
    run's provenance (commit, command, date, load)."""
    import importlib.metadata

    import torch

    from benchmarks.provenance import finish, provenance

    prov = finish(provenance())  # when the run started, and the load then
    m = prov["machine"]
    info: dict[str, Any] = {
        "cpu": m["cpu"], "cpu_cores": m["cpu_cores"], "cpu_flags": m["cpu_flags"],
        "gpu": m["gpu"]["name"] if m["gpu"] else None, **prov["versions"], "provenance": prov,
    }  # fmt: skip
    for name in ("jsonargparse",):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version())  # fmt: skip
    return info


# ---------------------------------------------------------------------------------------------
# What a section's results say, in numbers and in one line each
# ---------------------------------------------------------------------------------------------


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
        out[name] = {key: stats([r[key] for r in rs if r.get(key) is not None], digits)
                     for key, digits in (("tta_acc", 5), ("train_seconds", 3), ("wall_seconds", 2))}  # fmt: skip
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
        lines.append(f"pytest -m gpu: {counts}" if "tests" in t else f"pytest -m gpu: no report (exit {t['exit_code']})")
    if "compile" in results:
        c = results["compile"]
        why = c.get("skipped") or c.get("error")
        lines.append(f"--model.compile {'true' if c.get('pays') else 'false'}" + (f" ({why})" if why else
                     f": a step {c['eager_step_seconds']} s eager, {c['compiled_step_seconds']} s compiled, the "
                     f"first compiled one {c['first_compiled_step_seconds']} s"))  # fmt: skip
    if "overhead" in results:
        o = results["overhead"]
        lines.append(f"overhead: Trainer.fit / bare loop {o['ratio']:.3f} ({o['arch']}, batch {o['batch_size']}, "
                     f"{o['device']}; target >= {o['target_ratio']})")  # fmt: skip
    if "data" in results:
        d, w = results["data"], results.get("data_all_cores")
        line = (f"data: tensor loader {d['tensor_loader']['images_per_s']:,.0f} img/s ({d['device']}), "
                f"x{d['speedup']:.1f} ImageFolder+PIL with 2 workers")  # fmt: skip
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


def _process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): the budget counts the imports too."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return max(0.0, float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _write(path: Path, data: dict[str, Any]) -> None:
    from benchmarks.provenance import scrub

    data = scrub(json.loads(json.dumps(data, default=str)))  # results name no folder of the machine
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the section's process group (its DataLoader workers included), SIGKILL 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_section(name: str, data_dir: str, scratch: Path, target: float, timeout: float, a, log: Log) -> dict[str, Any]:
    """Run one section's process, stream its output into the log, and return its record."""
    work, result = scratch / name, scratch / f"{name}.result.json"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.gpu_evidence", "--section", name, "--data-dir", data_dir,
           "--work-dir", str(work), "--result", str(result), "--deadline", f"{time.time() + target:.1f}",
           "--configs", str(Path(a.configs).resolve()),
           *(["--quick"] if a.quick else []), *[f"--extra={e}" for e in a.extra_by_section.get(name, [])]]  # fmt: skip
    log(f"== {name}: aiming at {target:.0f} s, stopped at {timeout:.0f} s")
    log("+ " + shlex.join(cmd))
    env = child_env(PYTHONUNBUFFERED="1", TMPDIR=str(work))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)  # fmt: skip
    tail: deque[str] = deque(maxlen=TAIL_LINES)

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            log(f"[{name}] {tail[-1]}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code, timed_out = proc.wait(timeout=max(timeout, 1)), False
    except subprocess.TimeoutExpired:
        log(f"== {name}: time cap of {timeout:.0f} s reached, stopping it")
        _stop(proc)
        code, timed_out = proc.returncode, True
    reader.join(timeout=10)
    try:
        record = json.loads(result.read_text())
    except (OSError, ValueError):
        record = {}
    status = "timeout" if timed_out else "ok" if code == 0 else "failed"
    entry = {"status": status, "seconds": round(time.monotonic() - start, 1), "target_seconds": round(target, 1),
             "timeout_seconds": round(timeout, 1), "exit_code": code, "command": shlex.join(cmd),
             "machine": record.get("machine"), "commands": record.get("commands", []),
             "results": record.get("results", {})}  # fmt: skip
    if status != "ok":
        last = next((line for line in reversed(tail) if line.strip()), "")
        entry["error"] = record.get("error") or (f"stopped at its time cap of {timeout:.0f} s" if timed_out else last)
        entry.update(traceback=record.get("traceback"), output_tail=list(tail))
    return entry


def _reserve(later: list[str], room: float, costs: dict[str, Cost]) -> float:
    """Seconds the later sections' minimums need, counting those that fit in ``room`` in order."""
    total = 0.0
    for name in later:
        if total + costs[name].minimum <= room:
            total += costs[name].minimum
    return total


def _pairs(items: list[str], what: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or name not in SECTIONS:
            raise SystemExit(f"error: {what} takes SECTION=VALUE, SECTION one of {', '.join(SECTIONS)}; got {item!r}")
        out.setdefault(name, []).append(value)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="sections, in order: " + ", ".join(SECTIONS)
    )
    p.add_argument("--data-dir", required=True, help="the CIFAR-10 image folder (or archive); ignored with --quick")
    p.add_argument("--output-dir", required=True, help="where the JSON files and the log go (flat)")
    p.add_argument("--budget", type=float, required=True, help="seconds the whole command may take")
    p.add_argument("--skip-done", metavar="DIR", help="skip the sections whose JSON in DIR has status ok")
    p.add_argument("--quick", action="store_true", help="every section on the CPU with tiny synthetic data")
    p.add_argument("--configs", default=str(REPO / "configs"), help="the recipes folder (default: this clone's)")
    p.add_argument("--sections", help="comma-separated subset to run (default: all, in order)")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="SECTION=ARG",
        help="a CLI argument for every fit of SECTION, e.g. resnet18_fast=--trainer.max_epochs=20",
    )
    p.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS", help="another time cap for SECTION")
    a = p.parse_args(argv)
    a.selected = [s.strip() for s in a.sections.split(",")] if a.sections else list(SECTIONS)
    if unknown := [s for s in a.selected if s not in SECTIONS]:
        p.error(f"unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    a.extra_by_section = _pairs(a.extra, "--extra")
    a.caps = {k: float(v[-1]) for k, v in _pairs(a.cap, "--cap").items()}
    return a


def _prepare(a, scratch: Path, log: Log) -> tuple[str, dict[str, Any]]:
    """The data every section reads: a tiny synthetic folder with --quick, else DIR decoded once
    (its cache then serves every section)."""
    start = time.monotonic()
    if a.quick:
        from cifar_lightning.data.synthetic import write_image_folder

        folder = write_image_folder(scratch / "data", n_train=128, n_test=8)
        seconds = round(time.monotonic() - start, 1)
        return str(folder), {"data": "synthetic, 3 classes x (128 train + 8 test) images", "seconds": seconds}
    try:
        from cifar_lightning.data import CIFAR10DataModule

        log(f"== decoding {a.data_dir} once (cached for every section)")
        CIFAR10DataModule(data_dir=a.data_dir, download=False).prepare_data()
        return a.data_dir, {"data": a.data_dir, "seconds": round(time.monotonic() - start, 1)}
    except Exception as err:  # every section will fail on it and say why; the run goes on
        log(f"== the data could not be read: {type(err).__name__}: {err}")
        return a.data_dir, {"data": a.data_dir, "error": f"{type(err).__name__}: {err}"}


def _skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason, "seconds": 0.0, "commands": [], "results": {}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``scripts/gpu_evidence.py``: run the sections within the budget; returns the summary."""
    t0 = time.monotonic() - _process_age()
    a = parse_args(argv)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / LOG_NAME)
    costs = {name: QUICK_COST if a.quick else COSTS[name] for name in SECTIONS}
    costs |= {name: Cost(c.minimum, c.estimate, a.caps[name]) for name, c in costs.items() if name in a.caps}

    def recorded(index: int, name: str) -> Path | None:
        """The section's JSON in the --skip-done folder, when its status is ok."""
        earlier = Path(a.skip_done) / f"{index:02d}_{name}.json" if a.skip_done else None
        return earlier if earlier is not None and _status(earlier) == "ok" else None

    log(f"== gpu_evidence: budget {a.budget:.0f} s, sections {', '.join(a.selected)}" + " (--quick)" * a.quick)
    summary: dict[str, Any] = {"budget_seconds": a.budget, "quick": a.quick,
                               "argv": sys.argv[1:] if argv is None else argv}  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-evidence-") as tmp:
            scratch = Path(tmp)
            data_dir, summary["prepare"] = _prepare(a, scratch, log)
            summary["machine"] = info = machine()
            names = ("python", "torch", "lightning", "torchvision", "torchmetrics", "airbench")
            versions = ", ".join(f"{k} {info[k]}" for k in names)
            log(f"== machine: GPU {info['gpu'] or 'none'}, {info['cpu']} x{info['cpu_cores']}, {versions}")
            summary["sections"] = {}
            pending = [(i, n) for i, n in enumerate(SECTIONS, 1) if n in a.selected]
            for k, (index, name) in enumerate(pending):
                path, cost = out / f"{index:02d}_{name}.json", costs[name]
                left = a.budget - (time.monotonic() - t0)
                base = {"section": name, "index": index, "quick": a.quick, "cost": asdict(cost),
                        "budget_left_seconds": round(left, 1), "machine": info}  # fmt: skip
                earlier = recorded(index, name)
                if earlier is not None:
                    entry = _skipped(f"already recorded: {earlier} has status ok")
                elif left < cost.minimum:
                    entry = _skipped(f"does not fit: needs at least {cost.minimum:.0f} s (estimated), "
                                     f"{max(left, 0):.0f} s of the budget left")  # fmt: skip
                else:
                    later = [n for i, n in pending[k + 1 :] if recorded(i, n) is None]
                    target = min(cost.estimate, max(cost.minimum, left - _reserve(later, left - cost.minimum, costs)))
                    entry = run_section(name, data_dir, scratch, target, min(left, cost.cap), a, log)
                    entry["machine"] = entry["machine"] or info
                entry["headline"] = headline(entry["results"])
                if earlier is None or earlier.resolve() != path.resolve():  # never overwrite the record itself
                    _write(path, base | entry)
                keys = ("status", "seconds", "reason", "error", "exit_code", "headline")
                summary["sections"][name] = {key: entry.get(key) for key in keys} | {"file": path.name}
                if entry["status"] == "skipped":
                    log(f"== {name}: skipped, {entry['reason']}")
                else:
                    lines = "".join(f"\n   {h}" for h in entry["headline"])
                    log(f"== {name}: {entry['status']} in {entry['seconds']:.0f} s{lines}")
                summary["used_seconds"] = round(time.monotonic() - t0, 1)
                _write(out / SUMMARY_NAME, summary)
        skipped = [(n, s) for n, s in summary["sections"].items() if s["status"] == "skipped"]
        summary["skipped"] = [{"section": n, "reason": s["reason"]} for n, s in skipped]
        summary["used_seconds"] = round(time.monotonic() - t0, 1)
        _write(out / SUMMARY_NAME, summary)
        log(f"== done in {summary['used_seconds']:.0f} s of {a.budget:.0f}: "
            + ", ".join(f"{n} {s['status']}" for n, s in summary["sections"].items()))  # fmt: skip
    finally:
        log.close()
    return summary


# ---------------------------------------------------------------------------------------------
# A section's own process: python -m benchmarks.gpu_evidence --section NAME ...
# ---------------------------------------------------------------------------------------------


def section_functions() -> dict[str, Any]:
    """The sections by name, in the runner's order of priority (they import torch: call in a
    section's process only)."""
    from benchmarks.gpu_ablation import section_ablation
    from benchmarks.gpu_sections import SECTION_FUNCTIONS

    return {**SECTION_FUNCTIONS, "ablation": section_ablation}


def section_main(argv: list[str] | None = None) -> None:
    """Run one section and keep its record in ``--result`` as it goes."""
    from benchmarks.gpu_sections import Context

    functions = section_functions()

    p = argparse.ArgumentParser(description="one section of scripts/gpu_evidence.py, in its own process")
    p.add_argument("--section", required=True, choices=list(functions))
    p.add_argument("--data-dir", required=True)
    p.add_argument("--work-dir", required=True, type=Path, help="scratch folder, deleted by the runner")
    p.add_argument("--result", required=True, type=Path, help="the section's record (JSON)")
    p.add_argument("--deadline", required=True, type=float, help="Unix time by which to be done")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--configs", type=Path, default=REPO / "configs", help="the recipes folder")
    p.add_argument("--extra", action="append", default=[], help="a CLI argument for every fit of ours")
    a = p.parse_args(argv)
    a.work_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(a.section, a.data_dir, a.work_dir.resolve(), a.result, a.deadline, a.quick, a.extra, a.configs)
    ctx.record["machine"] = machine()
    ctx.save()
    try:
        functions[a.section](ctx)
    except BaseException as err:
        ctx.record["error"] = f"{type(err).__name__}: {err}"
        ctx.record["traceback"] = traceback.format_exc()[-4000:]
        raise
    finally:
        ctx.save()


if __name__ == "__main__":
    section_main()
