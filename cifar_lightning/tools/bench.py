"""Benchmarks of the fast path, each a ratio of two things measured in the same run.

1. ``data``: images/s of our training loader (``loader="tensor"``, ``standard`` augmentation)
   over torchvision's ``ImageFolder`` + PIL transforms + ``DataLoader(num_workers=2)`` reading the
   same images, the way the tutorials we grew from feed a network.
2. ``overhead``: training steps/s through ``Trainer.fit`` (the CLI's default callbacks and CSV
   logging) over a bare PyTorch loop with the same model, data, optimizer and batch, in steady
   state; also with the progress bar and model summary off, and with nothing at all.
3. ``tta`` (time to accuracy): a fastnet recipe (default ``configs/fastnet_muon.yaml``; ``--config
   configs/fastnet.yaml`` for the SGD one) end to end on the real data, trained as airbench
   trains (all 50,000 training images, no validation) and timed as it times itself: training
   plus the final test-time-augmented evaluation, data loading (decoding, caching) excluded.
   Test accuracy and seconds, mean over seeds. ``-- --trainer.max_steps=N`` fits the recipe to
   a time budget: its schedule is laid out over the N steps.
4. ``memory``: peak proportional set size (PSS) of a CPU fit with 2 DataLoader workers, main and
   worker processes summed, and how much of the dataset the workers hold privately (a copy per
   worker would show as about one dataset each).

``--quick`` runs every section on a tiny synthetic image folder in seconds, so the code cannot rot;
the targets (``TARGETS``) are reported, never asserted. ``scripts/bench.py`` is the command line.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from cifar_lightning.data.synthetic import write_image_folder
from cifar_lightning.report import write_report
from cifar_lightning.tools.bench_memory import bench_memory
from cifar_lightning.tools.bench_speed import TARGETS, BenchConfig, bench_data, bench_overhead, bench_time_to_accuracy

SECTIONS = ("data", "overhead", "memory", "tta")

# ---------------------------------------------------------------------------------------------
# Running, printing, saving
# ---------------------------------------------------------------------------------------------

SECTION_FUNCTIONS: dict[str, Callable[[BenchConfig], dict[str, Any]]] = {
    "data": bench_data,
    "overhead": bench_overhead,
    "memory": bench_memory,
    "tta": bench_time_to_accuracy,
}


def machine_info() -> dict[str, Any]:
    """Hardware and software of this run."""
    import lightning

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def run(cfg: BenchConfig, sections: list[str]) -> dict[str, Any]:
    """Run the named sections; returns the JSON-ready results (``meta`` plus one key per section)."""
    import warnings

    # The CLI is driven with explicit args on purpose; its note about sys.argv does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    unknown = [s for s in sections if s not in SECTION_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    results: dict[str, Any] = {"meta": machine_info() | {"quick": cfg.quick, "sections": sections}}
    results["config"] = asdict(cfg)
    results["targets"] = TARGETS
    for name in sections:
        start = time.perf_counter()
        results[name] = SECTION_FUNCTIONS[name](cfg)
        results[name]["bench_seconds"] = round(time.perf_counter() - start, 1)
    results["meta"]["load_average_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return results


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, measured, ratio, target) rows for the printed table."""
    rows = []
    if "data" in results:
        d = results["data"]
        rows.append((
            f"data: tensor loader vs ImageFolder+PIL, 2 workers (batch {d['batch_size']})",
            f"{d['tensor_loader']['images_per_s']:,.0f} vs {d['imagefolder_pil_2_workers']['images_per_s']:,.0f} img/s",
            f"{d['speedup']:.1f}x", f">= {d['target_speedup']:.0f}x",
        ))  # fmt: skip
        rows.append((
            "data: tensor loader vs decoded arrays + PIL transforms, 2 workers",
            f"{d['array_pil_loader_2_workers']['images_per_s']:,.0f} img/s", f"{d['speedup_over_array_pil']:.1f}x", "",
        ))  # fmt: skip
    if "overhead" in results:
        o = results["overhead"]
        med = o["median_step_seconds"]
        labels = {
            "defaults": f"overhead: Trainer.fit / bare loop ({o['arch']}, batch {o['batch_size']}, {o['device']})",
            "no_progress_bar": "overhead: without progress bar and summary",
            "bare_trainer": "overhead: no logger, no callbacks",
        }
        for variant, label in labels.items():
            rows.append((
                label, f"{1 / med[variant]:.3f} vs {1 / med['bare_loop_beside_' + variant]:.3f} steps/s",
                f"{o['ratio' if variant == 'defaults' else 'ratio_' + variant]:.3f}",
                f">= {o['target_ratio']:.2f}" if variant == "defaults" else "",
            ))  # fmt: skip
    if "tta" in results:
        t = results["tta"]
        rows.append((
            f"time to accuracy: {t['config']}, {len(t['runs'])} seed(s)",
            f"{100 * t['mean_test_acc']:.2f}% in {t['mean_seconds']:,.0f} s",
            f"acc {t['accuracy_ratio']:.4f}, time {t['time_ratio']:.3f}",
            f">= {100 * t['target_accuracy']:.2f}% in <= {t['target_seconds']:,.0f} s",
        ))  # fmt: skip
    if "memory" in results:
        m = results["memory"]
        two, none = m["torchvision_2_workers"], m["torchvision_0_workers"]
        rows.append((
            f"memory: CPU fit, peak PSS of main + 2 workers vs no workers ({m['arch']}, dataset {m['dataset_mb']:.0f} MB)",
            f"{two['pss_total_mb']:,.0f} vs {none['pss_total_mb']:,.0f} MB",
            f"+{m['workers_extra_mb']:,.0f} MB", "",
        ))  # fmt: skip
        rows.append((
            "memory: private copies of the dataset in the workers (pages they map: "
            f"{m['dataset_mapped_by_workers_mb']:,.0f} MB)",
            f"{two['dataset']['workers_private_mb']:,.1f} MB", f"{m['dataset_copies_in_workers']:.3f} copies", "0 (held once)",
        ))  # fmt: skip
        if m.get("tensor"):
            rows.append(("memory: CPU fit, tensor loader", f"{m['tensor']['pss_total_mb']:,.0f} MB", "", ""))
    return rows


def print_results(results: dict[str, Any]) -> None:
    """A rich table of the ratios, with the machine underneath."""
    from rich.console import Console
    from rich.table import Table

    meta = results["meta"]
    table = Table(title="cifar_lightning benchmarks" + (" (--quick: tiny synthetic data)" if meta["quick"] else ""))
    for name, justify in (("benchmark", "left"), ("measured", "right"), ("ratio", "right"), ("target", "right")):
        table.add_column(name, justify=justify)
    for row in summary_rows(results):
        table.add_row(*row)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    console.print(
        f"{meta['cpu']} x{meta['cpu_cores']}, GPU: {meta['gpu'] or 'none'}, torch {meta['torch']}, "
        f"lightning {meta['lightning']}, load average {meta['load_average_1min']} -> "
        f"{meta['load_average_1min_end']}, {meta['date']}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``scripts/bench.py``: parse arguments, run, print, save JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="data,overhead,memory",
                   help=f"comma-separated, of {', '.join(SECTIONS)} (default data,overhead,memory; "
                        "tta takes tens of minutes on a CPU)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="every section on tiny synthetic data, in seconds")
    p.add_argument("--output", help="write the results as JSON here, e.g. benchmarks/cpu.json")
    p.add_argument("--data-dir", default="data", help="image folder, archive or torchvision folder")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    p.add_argument("--config", default="configs/fastnet_muon.yaml", help="recipe of the tta section")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the tta section")
    p.add_argument("--overhead-arch", help="network of the overhead section (default resnet20 / fastnet on GPU)")
    p.add_argument("--overhead-batch-size", type=int, help="default 256 on a CPU, 1024 on a GPU")
    p.add_argument("--timed-steps", type=int, help="steps timed per overhead fit (default 20)")
    p.add_argument("--repeats", type=int, help="fits per overhead variant (default 1)")
    p.add_argument("tta_overrides", nargs="*", help="extra CLI arguments for the tta runs, after --")
    a = p.parse_args(argv)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    if a.sections == "all":
        sections = list(SECTIONS)
    kw: dict[str, Any] = dict(accelerator=a.accelerator, config=a.config, seeds=a.seeds)
    for name in ("overhead_arch", "overhead_batch_size", "timed_steps", "repeats"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    with tempfile.TemporaryDirectory() as tmp:
        if a.quick:
            data_dir = write_image_folder(Path(tmp) / "data", n_train=96, n_test=8)
            cfg = BenchConfig.quick_config(data_dir=str(data_dir), **kw)
            cfg.tta_overrides += a.tta_overrides
        else:
            cfg = BenchConfig(data_dir=a.data_dir, tta_overrides=a.tta_overrides, **kw)
        results = run(cfg, sections)
    print_results(results)
    if a.output:
        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_report(results, out)
        print(f"results: {out}")
    return results
