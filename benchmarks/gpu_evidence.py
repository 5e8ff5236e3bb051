"""One command for a short GPU window: the measurements the project still owes a GPU, in order of
priority, within a time budget, after a plan that says what fits.

``python scripts/gpu_evidence.py --data-dir DIR --output-dir OUT [--budget SECONDS] [--sections
LIST] [--skip-done DIR] [--quick]``. Before it starts, the command prints its plan: each section's
estimated seconds (``gpu_plan.COSTS``) against the budget (default ``gpu_plan.DEFAULT_BUDGET``),
and refuses a plan that cannot fit. Each section runs in its own process (``python -m
benchmarks.gpu_evidence --section NAME ...``, the code in ``gpu_sections``) under a time cap, and
its JSON is written the moment it ends; a section that fails or runs out of time is recorded with
its error, exit code and last lines of output, and the next one runs.

1. ``gpu_tests``: ``pytest -m gpu``, the cheapest decisive checks of the CUDA paths, before
   anything is measured on them. A run in which no test ran is not ok: ``skipped`` (with the
   reasons) with ``--quick``, ``failed`` where CUDA was expected.
2. ``airbench``: airbench94 (the ``airbench`` package, 0.1.8) beside ``configs/fastnet.yaml`` and
   ``configs/fastnet_muon.yaml`` through our CLI, all on the same images, seeds alternating (2 to
   5, as the time allows): TTA test accuracy, and training seconds counted as airbench counts
   them (training steps only), our time over airbench's and the accuracy difference.
3. ``overhead_data``: the bench ``overhead`` section (fastnet, batch 1024) and ``data`` section,
   and the per-image torchvision loaders again with every core as a worker.
4. ``resnet18_fast``: ``configs/resnet18_fast.yaml`` beside airbench95.
5. ``recipes``: ``configs/resnet34_tutorial.yaml`` and ``configs/mynet_tutorial.yaml`` as written,
   then one seed of ``configs/resnet20_paper.yaml``'s 64k iterations where it fits.
6. ``ablation``: resnet18 on a short schedule with each training trick, 2 seeds (``gpu_ablation``).
7. ``compile_sweep``: every network compiled (``gpu_compile``), last, within its own budget.

A plain run takes ``gpu_plan.DEFAULT_SECTIONS``; ``--sections all`` or a list takes others. A
section aims to finish within its estimate, less what the later sections' minimums need, and is
stopped at its cap; one whose minimum no longer fits when its turn comes is skipped and says so.
``--skip-done DIR`` skips the sections whose JSON in DIR has status "ok". OUT receives at most 8
files, flat: ``NN_<section>.json`` of each section that ran, ``summary.json`` and
``gpu_evidence.log`` (everything printed). Fits write into temporary folders that are deleted; no
checkpoint is kept. ``--quick`` runs the sections end to end on the CPU with a tiny synthetic image
folder (airbench's runs are then skipped: they need CUDA); without it the command needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import REPO, child_env
from benchmarks.gpu_plan import (
    DEFAULT_BUDGET,
    DEFAULT_SECTIONS,
    PREPARE_SECONDS,
    QUICK_PREPARE_SECONDS,
    SECTIONS,
    cuda_missing,
    describe,
    make_plan,
    refusal,
    section_costs,
    target,
)
from benchmarks.gpu_results import compare, headline, stats  # noqa: F401 (part of this module's interface)
from cifar_lightning.errors import UserError

LOG_NAME, SUMMARY_NAME = "gpu_evidence.log", "summary.json"
TAIL_LINES = 40


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
        "cpu": m["cpu"],
        "cpu_cores": m["cpu_cores"],
        "cpu_flags": m["cpu_flags"],
        "gpu": m["gpu"]["name"] if m["gpu"] else None,
        **prov["versions"],
        "provenance": prov,
    }
    for name in ("jsonargparse",):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
        )
    return info


# ---------------------------------------------------------------------------------------------
# What a section's results say, in numbers and in one line each
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


def run_section(
    name: str, data_dir: str, scratch: Path, target: float, timeout: float, a, log: Log, earlier: Path | None = None
) -> dict[str, Any]:
    """Run one section's process, stream its output into the log, and return its record. Without
    --quick the section expects CUDA; ``earlier`` is its record from the --skip-done folder."""
    work, result = scratch / name, scratch / f"{name}.result.json"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.gpu_evidence",
        "--section",
        name,
        "--data-dir",
        data_dir,
        "--work-dir",
        str(work),
        "--result",
        str(result),
        "--deadline",
        f"{time.time() + target:.1f}",
        "--configs",
        str(Path(a.configs).resolve()),
        *(["--quick"] if a.quick else ["--expect-cuda"]),
        *([f"--earlier={earlier.resolve()}"] if earlier is not None else []),
        *[f"--extra={e}" for e in a.extra_by_section.get(name, [])],
    ]
    log(f"== {name}: aiming at {target:.0f} s, stopped at {timeout:.0f} s")
    log("+ " + shlex.join(cmd))
    env = child_env(PYTHONUNBUFFERED="1", TMPDIR=str(work))
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
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
    # A section that ended well may say it did less: "skipped" (it ran nothing: pytest -m gpu
    # without CUDA) or "incomplete" (the compile sweep's budget ended first), with the reason.
    outcome = record.get("outcome") if status == "ok" else None
    entry = {
        "status": outcome["status"] if outcome else status,
        "seconds": round(time.monotonic() - start, 1),
        "target_seconds": round(target, 1),
        "timeout_seconds": round(timeout, 1),
        "exit_code": code,
        "command": shlex.join(cmd),
        "machine": record.get("machine"),
        "commands": record.get("commands", []),
        "results": record.get("results", {}),
    }
    if outcome:
        entry["reason"] = outcome["reason"]
    if status != "ok":
        last = next((line for line in reversed(tail) if line.strip()), "")
        entry["error"] = record.get("error") or (f"stopped at its time cap of {timeout:.0f} s" if timed_out else last)
        entry.update(traceback=record.get("traceback"), output_tail=list(tail))
    return entry


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
    p.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET,
        help=f"seconds the command may take (default {DEFAULT_BUDGET:.0f}: one command of ~8 minutes)",
    )
    p.add_argument("--skip-done", metavar="DIR", help="skip the sections whose JSON in DIR has status ok")
    p.add_argument("--quick", action="store_true", help="every section on the CPU with tiny synthetic data")
    p.add_argument("--configs", default=str(REPO / "configs"), help="the recipes folder (default: this clone's)")
    p.add_argument("--sections", help=f"comma-separated, or all (default: {','.join(DEFAULT_SECTIONS)}); run in order")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="SECTION=ARG",
        help="a CLI argument for every fit of SECTION, e.g. resnet18_fast=--trainer.max_epochs=20",
    )
    p.add_argument(
        "--cap",
        action="append",
        default=[],
        metavar="SECTION=SECONDS",
        help="another time cap for SECTION (its estimate and minimum at most that)",
    )
    a = p.parse_args(argv)
    chosen = [s.strip() for s in a.sections.split(",")] if a.sections else list(DEFAULT_SECTIONS)
    a.selected = (
        list(SECTIONS)
        if chosen == ["all"]
        else [s for s in SECTIONS if s in chosen] + [s for s in chosen if s not in SECTIONS]
    )
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


def _file(name: str) -> str:
    return f"{SECTIONS.index(name) + 1:02d}_{name}.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``scripts/gpu_evidence.py``: print the plan, refuse one that cannot fit, then run the
    sections within the budget; returns the summary."""
    t0 = time.monotonic() - _process_age()
    a = parse_args(argv)
    costs, prepare = section_costs(a.quick, a.caps), QUICK_PREPARE_SECONDS if a.quick else PREPARE_SECONDS

    def recorded(name: str) -> Path | None:
        """The section's JSON in the --skip-done folder, whatever its status."""
        earlier = Path(a.skip_done) / _file(name) if a.skip_done else None
        return earlier if earlier is not None and earlier.is_file() else None

    done = {name for name in a.selected if (earlier := recorded(name)) is not None and _status(earlier) == "ok"}
    plan = make_plan(a.selected, costs, a.budget, prepare, done)
    heading = f"== plan: budget {a.budget:.0f} s" + (" (--quick)" if a.quick else ", estimates for one H100")
    plan_lines = [heading, *describe(plan, a.budget, prepare)]
    print("\n".join(plan_lines), flush=True)
    if why := refusal(plan, a.budget, prepare) or (None if a.quick else cuda_missing()):
        raise UserError(why)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / LOG_NAME)
    summary: dict[str, Any] = {
        "budget_seconds": a.budget,
        "quick": a.quick,
        "argv": sys.argv[1:] if argv is None else argv,
        "plan": [asdict(row) for row in plan],
    }
    try:
        for line in plan_lines:
            log.file.write(line + "\n")  # printed above
        with tempfile.TemporaryDirectory(prefix="gpu-evidence-") as tmp:
            scratch = Path(tmp)
            data_dir, summary["prepare"] = _prepare(a, scratch, log)
            summary["machine"] = info = machine()
            names = ("python", "torch", "lightning", "torchvision", "torchmetrics", "airbench")
            versions = ", ".join(f"{k} {info[k]}" for k in names)
            log(f"== machine: GPU {info['gpu'] or 'none'}, {info['cpu']} x{info['cpu_cores']}, {versions}")
            summary["sections"] = {}
            pending = [row.section for row in plan if row.reason is None]
            for k, name in enumerate(pending):
                path, cost = out / _file(name), costs[name]
                left = a.budget - (time.monotonic() - t0)
                if left < cost.minimum:  # the earlier sections took longer than their estimates
                    entry = {
                        "status": "skipped",
                        "reason": f"does not fit: needs at least {cost.minimum:.0f} s "
                        f"(estimated), {max(left, 0):.0f} s of the budget left",
                    }
                else:
                    aim = target(cost, left, pending[k + 1 :], costs)
                    entry = run_section(name, data_dir, scratch, aim, min(left, cost.cap), a, log, recorded(name))
                    entry["machine"] = entry["machine"] or info
                    entry["headline"] = headline(entry["results"])
                    base = {
                        "section": name,
                        "index": SECTIONS.index(name) + 1,
                        "quick": a.quick,
                        "cost": asdict(cost),
                        "budget_left_seconds": round(left, 1),
                        "machine": info,
                    }
                    _write(path, base | entry)
                keys = ("status", "seconds", "reason", "error", "exit_code", "headline")
                ran = "seconds" in entry
                summary["sections"][name] = {key: entry.get(key) for key in keys} | {"file": path.name if ran else None}
                lines = "".join(f"\n   {h}" for h in entry.get("headline", []))
                why = f", {entry['reason']}" if entry.get("reason") else ""
                took = f" in {entry['seconds']:.0f} s" if ran else ""
                log(f"== {name}: {entry['status']}{took}{why}{lines}")
                summary["used_seconds"] = round(time.monotonic() - t0, 1)
                _write(out / SUMMARY_NAME, summary)
        # The sections the plan left out are in the summary, in their place, with no file of their own.
        left_out = {"status": "skipped", "file": None}
        summary["sections"] = {
            row.section: summary["sections"].get(row.section) or left_out | {"reason": row.reason} for row in plan
        }
        skipped = [(n, s) for n, s in summary["sections"].items() if s["status"] == "skipped"]
        summary["skipped"] = [{"section": n, "reason": s["reason"]} for n, s in skipped]
        summary["used_seconds"] = round(time.monotonic() - t0, 1)
        _write(out / SUMMARY_NAME, summary)
        log(
            f"== done in {summary['used_seconds']:.0f} s of {a.budget:.0f}: "
            + ", ".join(f"{n} {s['status']}" for n, s in summary["sections"].items())
        )
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
    from benchmarks.gpu_compile import section_compile_sweep
    from benchmarks.gpu_sections import SECTION_FUNCTIONS

    return {**SECTION_FUNCTIONS, "ablation": section_ablation, "compile_sweep": section_compile_sweep}


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
    p.add_argument("--expect-cuda", action="store_true", help="fail where this process sees no CUDA device")
    p.add_argument("--earlier", type=Path, help="this section's record from an earlier run (--skip-done)")
    a = p.parse_args(argv)
    a.work_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        a.section,
        a.data_dir,
        a.work_dir.resolve(),
        a.result,
        a.deadline,
        a.quick,
        a.extra,
        a.configs,
        expect_cuda=a.expect_cuda,
        earlier=a.earlier,
    )
    ctx.record["machine"] = machine()
    ctx.save()
    try:
        if ctx.expect_cuda and not ctx.cuda:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            raise RuntimeError(
                "CUDA was expected (the command runs without --quick), but this section's process "
                f"sees no CUDA device (CUDA_VISIBLE_DEVICES={visible})"
            )
        functions[a.section](ctx)
    except BaseException as err:
        ctx.record["error"] = f"{type(err).__name__}: {err}"
        ctx.record["traceback"] = traceback.format_exc()[-4000:]
        raise
    finally:
        ctx.save()


if __name__ == "__main__":
    section_main()
