"""Benchmarks of the fast path, each a ratio of two things measured in the same run.

1. ``data``: images/s of our training loader (``loader="tensor"``, ``standard`` augmentation)
   over torchvision's ``ImageFolder`` + PIL transforms + ``DataLoader(num_workers=2)`` reading the
   same images, the way the tutorials we grew from feed a network.
2. ``overhead``: the framework's milliseconds per step, and the ratio of steps/s, of
   ``Trainer.fit`` (the CLI's default callbacks and CSV logging) against a bare PyTorch loop with
   the same model, data, optimizer and batch, timed in alternating blocks; also with the
   progress bar and model summary off, with no logger and no callbacks, and for Lightning alone
   (a minimal LightningModule: the floor under what this package adds). The default step is short
   (simple_cnn, batch 32 on a CPU) so that a millisecond of framework shows.
3. ``time_to_accuracy``: airbench94 (the installed ``airbench`` package, on a CPU in fp32,
   ``bench_airbench.py``) and the fastnet recipes (``configs/fastnet.yaml``,
   ``configs/fastnet_muon.yaml``) end to end on the same images, alternating runner by runner
   within each seed. Every runner trains as airbench trains (all 50,000 training images, no
   validation), each recipe on as many images as it was sized for (its epochs rescaled from the
   45,000 images its validation split leaves), and is timed as airbench times itself: training
   plus the final test-time-augmented evaluation, data loading (decoding, caching) excluded.
   Reported: test accuracy and seconds per runner, and against airbench94 the time ratio and the
   accuracy difference, with their spread over seeds. ``-- --trainer.max_steps=N`` fits the
   recipes to a time budget: their schedules are laid out over the N steps.
4. ``memory``: peak proportional set size (PSS) of a CPU fit with 2 DataLoader workers, main and
   worker processes summed, and how much of the dataset the workers hold privately (a copy per
   worker would show as about one dataset each).
5. ``tricks``: training images/s with each training trick (EMA, SWA, MixUp, CutMix, Cutout,
   random erasing, the policies, SAM) against none, fits of resnet20 one after another
   (``bench_tricks.py``).
6. ``layout``: a training step of every network in channels-last memory against NCHW, one of
   each in turn, with a verdict per network and per family (``bench_layout.py``).

``--quick`` runs every section on a tiny synthetic image folder in seconds, so the code cannot rot;
the targets (``TARGETS``) are reported, never asserted. ``scripts/bench.py`` is the command line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from benchmarks.bench_layout import bench_layout
from benchmarks.bench_memory import bench_memory
from benchmarks.bench_overhead import bench_overhead
from benchmarks.bench_speed import TARGETS, BenchConfig, bench_data
from benchmarks.bench_time_to_accuracy import bench_time_to_accuracy
from benchmarks.bench_time_to_accuracy import merge_results as merge_time_to_accuracy
from benchmarks.bench_tricks import bench_tricks
from benchmarks.provenance import finish, provenance
from cifar_lightning.data.synthetic import write_image_folder
from cifar_lightning.report import write_report

SECTIONS = ("data", "overhead", "memory", "time_to_accuracy", "tricks", "layout")

# ---------------------------------------------------------------------------------------------
# Running, printing, saving
# ---------------------------------------------------------------------------------------------

SECTION_FUNCTIONS: dict[str, Callable[[BenchConfig], dict[str, Any]]] = {
    "data": bench_data,
    "overhead": bench_overhead,
    "memory": bench_memory,
    "time_to_accuracy": bench_time_to_accuracy,
    "tricks": bench_tricks,
    "layout": bench_layout,
}


def run(cfg: BenchConfig, sections: list[str], save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the named sections; returns the JSON-ready results (``provenance``, ``meta``, one key per
    section). ``save(results)`` is called after each section and each time-to-accuracy run."""
    unknown = [s for s in sections if s not in SECTION_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    prov = provenance(None if cfg.quick else cfg.data_dir)
    results: dict[str, Any] = {
        "provenance": prov,
        "meta": {"quick": cfg.quick, "sections": sections, "complete": False},
    }
    results["config"] = {k: v for k, v in asdict(cfg).items() if k not in ("data_dir", "work_dir")}
    results["targets"] = TARGETS

    def keep(partial: dict[str, Any] | None = None, name: str | None = None) -> None:
        if name is not None:
            results[name] = partial
        if save is not None:
            save(results | {"provenance": finish(prov, final=False)})

    for name in sections:
        start = time.perf_counter()
        fn = SECTION_FUNCTIONS[name]
        results[name] = fn(cfg, on_run=lambda part, n=name: keep(part, n)) if name == "time_to_accuracy" else fn(cfg)
        results[name]["bench_seconds"] = round(time.perf_counter() - start, 1)
        keep()
    results["meta"]["complete"] = True
    results["provenance"] = finish(prov)
    return results


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, measured, ratio, target) rows for the printed table."""
    rows = []
    if "data" in results:
        d = results["data"]
        rows.append(
            (
                f"data: tensor loader vs ImageFolder+PIL, 2 workers (batch {d['batch_size']})",
                f"{d['tensor_loader']['images_per_s']:,.0f} vs {d['imagefolder_pil_2_workers']['images_per_s']:,.0f} img/s",
                f"{d['speedup']:.1f}x",
                f">= {d['target_speedup']:.0f}x",
            )
        )
        rows.append(
            (
                "data: tensor loader vs decoded arrays + PIL transforms, 2 workers",
                f"{d['array_pil_loader_2_workers']['images_per_s']:,.0f} img/s",
                f"{d['speedup_over_array_pil']:.1f}x",
                "",
            )
        )
        p = d.get("presets")
        for name, r in (p or {}).get("presets", {}).items():
            rows.append(
                (
                    f"data: {name}, tensor loader vs per image in 2 workers (vs crop + flip: {r['tensor_over_standard_tensor']:.2f}x)",
                    f"{r['tensor_loader_images_per_s']:,.0f} vs {r['per_image_2_workers_images_per_s']:,.0f} img/s",
                    f"{r['tensor_over_per_image']:.1f}x",
                    ">= 10x" if name == "trivialaugment" else "",
                )
            )
        if p:
            rows.append(
                (
                    f"data: trivialaugment on the tensor loader vs resnet20 training ({p['resnet20_training_images_per_s']:,.0f} img/s)",
                    "",
                    f"{p['policy_over_resnet20_training']:.1f}x",
                    ">= 5x",
                )
            )
    if "overhead" in results:
        o = results["overhead"]
        labels = {
            "terminal": "overhead: the defaults on a terminal (the rich bar)",
            "defaults": f"overhead: Trainer.fit / bare loop ({o['arch']}, batch {o['batch_size']}, {o['device']}, "
            f"bare step {o['bare_step_ms']:.1f} ms)",
            "no_progress_bar": "overhead: without progress bar and summary",
            "bare_trainer": "overhead: no logger, no callbacks",
            "lightning_floor": "overhead: Lightning alone (a minimal LightningModule, no callbacks)",
        }
        target = f">= {o['target_ratio']:.2f}" + (
            f", <= {o['target_framework_ms']} ms" if o.get("target_framework_ms") else ""
        )
        for variant, label in labels.items():
            if variant not in o["framework_ms_per_step"]:  # results made before the variant existed
                continue
            rows.append(
                (
                    label,
                    f"{o['framework_ms_per_step'][variant]:+.2f} ms a step",
                    f"{o['ratio' if variant == 'defaults' else 'ratio_' + variant]:.3f}",
                    target if variant == "defaults" else "",
                )
            )
        if "ours_ms_per_step" in o:
            ours_target = f"<= {o['target_ours_ms']} ms" if o.get("target_ours_ms") is not None else ""
            rows.append(
                (
                    "overhead: this package above Lightning alone",
                    f"{o['ours_ms_per_step']:+.2f} ms a step",
                    "",
                    ours_target,
                )
            )
    if "time_to_accuracy" in results:
        target = results.get("targets", TARGETS)["time_to_accuracy"]
        for runner, s in results["time_to_accuracy"]["summary"].items():
            spread = f" ± {100 * s['std_test_acc']:.2f}" if s["std_test_acc"] is not None else ""
            vs = s.get("against_airbench94")
            ratio = ""
            if vs:
                tstd = f" ± {vs['time_ratio_std']:.3f}" if vs["time_ratio_std"] is not None else ""
                astd = f" ± {vs['accuracy_difference_std']:.2f}" if vs["accuracy_difference_std"] is not None else ""
                ratio = f"time {vs['time_ratio']:.3f}{tstd}, acc {vs['accuracy_difference_points']:+.2f}{astd} pts"
            rows.append(
                (
                    f"time to accuracy: {runner}, {s['n']} seed(s), {s['mean_images_seen']:,} images",
                    f"{100 * s['mean_test_acc']:.2f}%{spread} in {s['mean_seconds']:,.0f} s",
                    ratio,
                    f"time <= {target['time_ratio']:.2f}x, acc >= {target['accuracy_difference_points']:+.1f} pts"
                    if vs
                    else "(baseline)"
                    if runner == "airbench94"
                    else "",
                )
            )
    if "memory" in results:
        m = results["memory"]
        two, none = m["torchvision_2_workers"], m["torchvision_0_workers"]
        rows.append(
            (
                f"memory: CPU fit, peak PSS of main + 2 workers vs no workers ({m['arch']}, dataset {m['dataset_mb']:.0f} MB)",
                f"{two['pss_total_mb']:,.0f} vs {none['pss_total_mb']:,.0f} MB",
                f"+{m['workers_extra_mb']:,.0f} MB",
                "",
            )
        )
        rows.append(
            (
                "memory: private copies of the dataset in the workers (pages they map: "
                f"{m['dataset_mapped_by_workers_mb']:,.0f} MB)",
                f"{two['dataset']['workers_private_mb']:,.1f} MB",
                f"{m['dataset_copies_in_workers']:.3f} copies",
                "0 (held once)",
            )
        )
        if m.get("tensor"):
            rows.append(("memory: CPU fit, tensor loader", f"{m['tensor']['pss_total_mb']:,.0f} MB", "", ""))
    if "tricks" in results:
        t = results["tricks"]
        for name, r in t["tricks"].items():
            # A ratio inside the run's own spread over rounds is not a measurement of the trick.
            ratio = (
                f"{r['over_standard']:.2f}x" if r.get("beyond_noise", True) or name == "standard" else "within noise"
            )
            rows.append(
                (
                    f"tricks: {name} ({t['arch']}, batch {t['batch_size']}, training images/s)",
                    f"{r['images_per_s']:,.0f} img/s",
                    ratio,
                    "",
                )
            )
    return rows


def print_results(results: dict[str, Any]) -> None:
    """A rich table of the ratios, with the machine underneath."""
    from rich.console import Console
    from rich.table import Table

    meta, prov = results["meta"], results["provenance"]
    table = Table(title="cifar_lightning benchmarks" + (" (--quick: tiny synthetic data)" if meta["quick"] else ""))
    for name, justify in (("benchmark", "left"), ("measured", "right"), ("ratio", "right"), ("target", "right")):
        table.add_column(name, justify=justify)
    for row in summary_rows(results):
        table.add_row(*row)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    m, v = prov["machine"], prov["versions"]
    gpu = m["gpu"]["name"] if m["gpu"] else "none"
    console.print(
        f"{m['cpu']} x{m['cpu_cores']}, GPU: {gpu}, torch {v['torch']}, lightning {v['lightning']}, "
        f"load average {prov['load_average_1min_start']} -> {prov['load_average_1min_end']} "
        f"(max {prov['load_average_1min_max']}), commit {(prov['commit'] or '?')[:10]}"
        f"{' + uncommitted changes' if prov['uncommitted_changes'] else ''}, {prov['started'][:19]}"
    )


def _merge(parser: argparse.ArgumentParser, paths: list[str], output: str | None) -> dict[str, Any]:
    if not output:
        parser.error("--merge needs --output, the file to write")
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        results = merge_time_to_accuracy(paths)
    except (ValueError, KeyError) as err:
        parser.error(f"cannot merge: {err}")
    results["targets"] = TARGETS
    print_results(results)
    write_report(results, output)
    print(f"results: {output}")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``scripts/bench.py``: parse arguments, run, print, save JSON."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sections",
        default="data,overhead,memory",
        help=f"comma-separated, of {', '.join(SECTIONS)} (default data,overhead,memory; "
        "time_to_accuracy takes tens of minutes on a CPU)",
    )
    p.add_argument("--quick", action="store_true", help="every section on tiny synthetic data, in seconds")
    p.add_argument("--output", help="write the results as JSON here, e.g. benchmarks/cpu.json")
    p.add_argument("--data-dir", default="data", help="image folder, archive or torchvision folder")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    p.add_argument(
        "--runners",
        nargs="+",
        help="runners of the time_to_accuracy section, alternated per seed: airbench94 "
        "and recipe files (default airbench94 configs/fastnet.yaml configs/fastnet_muon.yaml)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the time_to_accuracy section")
    p.add_argument("--overhead-arch", help="network of the overhead section (default simple_cnn / fastnet on GPU)")
    p.add_argument("--overhead-batch-size", type=int, help="default 32 on a CPU, 1024 on a GPU")
    p.add_argument("--timed-steps", type=int, help="steps timed per overhead fit (default 250)")
    p.add_argument("--repeats", type=int, help="fits per overhead variant (default 4)")
    p.add_argument(
        "--tricks-rounds", type=int, help="rounds of the tricks section, each fit's fastest kept (default 3)"
    )
    p.add_argument("--tricks-steps", type=int, help="timed steps of each tricks fit (default 20)")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="FILE",
        help="no run: merge time_to_accuracy results of separate "
        "runs (seeds run apart) into --output, the summary recomputed over all their seeds",
    )
    p.add_argument("fit_overrides", nargs="*", help="extra CLI arguments for the time_to_accuracy runs, after --")
    a = p.parse_args(argv)
    if a.merge:
        return _merge(p, a.merge, a.output)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    if a.sections == "all":
        sections = list(SECTIONS)
    kw: dict[str, Any] = dict(accelerator=a.accelerator, seeds=a.seeds)
    for name in (
        "runners",
        "overhead_arch",
        "overhead_batch_size",
        "timed_steps",
        "repeats",
        "tricks_rounds",
        "tricks_steps",
    ):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    with tempfile.TemporaryDirectory() as tmp:
        if a.quick:
            data_dir = write_image_folder(Path(tmp) / "data", n_train=96, n_test=8)
            cfg = BenchConfig.quick_config(data_dir=str(data_dir), **kw)
            cfg.fit_overrides += a.fit_overrides
        else:
            cfg = BenchConfig(data_dir=a.data_dir, fit_overrides=a.fit_overrides, **kw)
        out = Path(a.output) if a.output else None
        results = run(cfg, sections, save=(lambda r: write_report(r, out)) if out else None)
    print_results(results)
    if out:
        write_report(results, out)
        print(f"results: {out}")
    return results
