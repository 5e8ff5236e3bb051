"""Time to accuracy: airbench94 (the installed package) and the fastnet recipes end to end on the
same images, alternating runner by runner; ``bench.py``'s ``time_to_accuracy`` section."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import REPO
from benchmarks.bench_speed import BenchConfig, _device, _sync
from benchmarks.fitting import build_fit, prepare, quiet_args


def _epoch_timer_callback(times: list[float], device: torch.device):
    from lightning.pytorch.callbacks import Callback

    class _EpochTimer(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            _sync(device)
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            _sync(device)
            times.append(time.perf_counter() - self._start)
            print(f"epoch {trainer.current_epoch}: {times[-1]:.1f} s", flush=True)

    return _EpochTimer()


def recipe_steps(config: str | Path, train_images: int) -> int | None:
    """Steps that show ``config`` as many images as it was sized for, when trained on ``train_images``.

    A recipe's epochs are sized for the training images its ``val_size`` leaves (45,000 for
    fastnet: 11 epochs); trained on all of them, as airbench trains, the same epochs would show it
    11% more images. None when the recipe sets no ``max_epochs``.
    """
    import yaml

    from cifar_lightning.data.splits import val_count

    recipe = yaml.safe_load(Path(config).read_text()) or {}
    epochs = (recipe.get("trainer") or {}).get("max_epochs")
    data = recipe.get("data") or {}
    if not epochs:
        return None
    sized_for = train_images - val_count(data.get("val_size", 0.1), train_images)
    return max(1, round(epochs * sized_for / data.get("batch_size", 128)))


def _train_split_size(data_dir: str) -> int:
    from cifar_lightning.data.sources import load_split, resolve_source

    return len(load_split(resolve_source(data_dir, download=False), "train")[1])


def run_recipe(cfg: BenchConfig, config: str, seed: int) -> dict[str, Any]:
    """One seed of a recipe: fit, then the TTA test; data decoded and cached before the clock.
    The fit keeps the CLI's callbacks, checkpoints included (last.ckpt after each epoch counts in
    the time), as the committed results were made.

    ``config`` is a path, or relative to the repository (``configs/fastnet.yaml``)."""
    config = config if Path(config).is_file() else str(REPO / config)
    device = _device(cfg.accelerator)
    with tempfile.TemporaryDirectory() as out:
        # All 50,000 training images and no validation, as airbench trains and times itself.
        args = [*quiet_args(cfg.data_dir, out, seed, cfg.accelerator), "--data.val_size=0", *cfg.fit_overrides]
        if not any(a.startswith(("--trainer.max_steps", "--trainer.limit_train_batches")) for a in cfg.fit_overrides):
            steps = recipe_steps(config, _train_split_size(cfg.data_dir))
            args += [f"--trainer.max_steps={steps}"] if steps else []  # the schedules are laid over it
        epoch_times: list[float] = []
        cli = build_fit(config, args, checkpoints=True, callbacks=[_epoch_timer_callback(epoch_times, device)])
        trainer, model, dm = cli.trainer, cli.model, cli.datamodule
        prepare(cli)
        _sync(device)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        _sync(device)
        fit_seconds = time.perf_counter() - start
        (metrics,) = trainer.test(model, datamodule=dm, verbose=False)
        _sync(device)
        total = time.perf_counter() - start
    batch = dm.hparams.batch_size
    return {
        "runner": Path(config).stem,
        "seed": seed,
        "test_acc": round(float(metrics["test/acc"]), 5),
        "seconds": round(total, 2),
        "seconds_counted_by": "bench (fit, whitening init and set-up included, + TTA test)",
        "fit_seconds": round(fit_seconds, 2),
        "test_seconds": round(total - fit_seconds, 2),
        "steps": trainer.global_step,
        "batch_size": batch,
        "epochs": trainer.current_epoch,
        "seconds_per_epoch": round(float(np.mean(epoch_times)), 2) if epoch_times else None,
        "train_images": len(dm.train_set),
        "images_seen": trainer.global_step * batch,
        "test_images": len(dm.test_set),
        "tta": model.hparams.tta,
        "precision": str(trainer.precision),
        "device": str(device),
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    acc = [r["test_acc"] for r in runs]
    secs = [r["seconds"] for r in runs]
    return {
        "n": len(runs),
        "mean_test_acc": round(float(np.mean(acc)), 5),
        "std_test_acc": round(float(np.std(acc, ddof=1)), 5) if len(acc) > 1 else None,
        "mean_seconds": round(float(np.mean(secs)), 2),
        "std_seconds": round(float(np.std(secs, ddof=1)), 2) if len(secs) > 1 else None,
        "mean_images_seen": round(float(np.mean([r["images_seen"] for r in runs]))),
    }


def compare_to_baseline(runs: list[dict[str, Any]], baseline: str = "airbench94") -> dict[str, Any]:
    """Per runner: mean and spread, and against ``baseline`` the time ratio (ours / theirs) and the
    accuracy difference (points), each over the seeds both ran, with its spread over those pairs."""
    by_runner: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_runner.setdefault(r["runner"], {})[r["seed"]] = r
    out: dict[str, Any] = {name: _summary(list(seeds.values())) for name, seeds in by_runner.items()}
    base = by_runner.get(baseline)
    if base:
        for name, seeds in by_runner.items():
            if name == baseline:
                continue
            common = sorted(set(seeds) & set(base))
            if not common:
                continue
            ratios = [seeds[s]["seconds"] / base[s]["seconds"] for s in common]
            diffs = [100 * (seeds[s]["test_acc"] - base[s]["test_acc"]) for s in common]
            images = [seeds[s]["images_seen"] / base[s]["images_seen"] for s in common]
            out[name]["against_" + baseline] = {
                "seeds": common,
                "time_ratio": round(float(np.mean(ratios)), 4),
                "time_ratio_std": round(float(np.std(ratios, ddof=1)), 4) if len(common) > 1 else None,
                "accuracy_difference_points": round(float(np.mean(diffs)), 3),
                "accuracy_difference_std": round(float(np.std(diffs, ddof=1)), 3) if len(common) > 1 else None,
                "images_seen_ratio": round(float(np.mean(images)), 4),
            }
    return out


def bench_time_to_accuracy(cfg: BenchConfig, on_run=None) -> dict[str, Any]:
    """airbench94 and the recipes in ``cfg.runners``, alternating within each seed, on the same images.

    ``on_run(partial_results)`` is called after every run, so a long benchmark keeps what it has.
    """
    from benchmarks.bench_airbench import airbench_version, run_airbench94, write_airbench_data

    runs: list[dict[str, Any]] = []
    skipped = None
    runners = list(cfg.runners)
    if "airbench94" in runners and airbench_version() is None:
        runners.remove("airbench94")
        skipped = "airbench94: the airbench package is not installed (pip install -e '.[dev]')"
        print(skipped, flush=True)

    def results() -> dict[str, Any]:
        return {
            "runners": runners,
            "seeds": cfg.seeds,
            "device": str(_device(cfg.accelerator)),
            "order": "for each seed, the runners one after another, the order above turned by the seed (seed 1: from the second)",
            "runs": runs,
            "summary": compare_to_baseline(runs),
            "skipped": skipped,
        }

    device = _device(cfg.accelerator)
    with tempfile.TemporaryDirectory() as tmp:
        ab_folder = Path(write_airbench_data(cfg.data_dir, Path(tmp))["folder"]) if "airbench94" in runners else None
        for seed in cfg.seeds:
            # The order turns by one runner per seed, so no runner always goes first, also when
            # seeds run in separate runs and are merged (``bench.py --merge``).
            for runner in runners[seed % len(runners) :] + runners[: seed % len(runners)]:
                if runner == "airbench94":
                    runs.append(run_airbench94(ab_folder, seed, quick=cfg.quick, device=device))
                else:
                    runs.append(run_recipe(cfg, runner, seed))
                print(f"{runner} seed {seed}: " + json.dumps(runs[-1]), flush=True)
                if on_run is not None:
                    on_run(results())
    return results()


def merge_results(paths: list[str | Path]) -> dict[str, Any]:
    """One time-to-accuracy result from several runs of the section (seeds run apart, each a file
    ``bench.py`` wrote): their runs together and the summary recomputed over all seeds, with each
    source's file, provenance and section settings under ``sources``. The sources must have run the
    same runners on the same data copy, and no seed twice; a ``ValueError`` says which did not."""
    from benchmarks.provenance import describe_path, finish, provenance

    sources, runs, seen = [], [], set()
    for path in paths:
        result = json.loads(Path(path).read_text())
        # "tta" is the section's name in files written before it was called time_to_accuracy.
        section = result.get("time_to_accuracy") or result.get("tta")
        if section is None:
            raise ValueError(f"{path} holds no time_to_accuracy section: pass files that bench.py wrote with it")
        for run in section["runs"]:
            if (run["runner"], run["seed"]) in seen:
                raise ValueError(f"{path}: {run['runner']} seed {run['seed']} appears twice in the files given")
            seen.add((run["runner"], run["seed"]))
        runs += section["runs"]
        config = result.get("config") or {}
        sources.append(
            {
                "file": describe_path(path),
                "provenance": result["provenance"],
                "complete": result["meta"]["complete"],
                "runners": section["runners"],
                "seeds": section["seeds"],
                "order": section.get("order"),
                "device": section.get("device"),
                "quick": result["meta"].get("quick", False),
                # "tta_overrides": the same list, as files written before the section's rename call it.
                "fit_overrides": config.get("fit_overrides", config.get("tta_overrides", [])),
            }
        )
    # One comparison: the same runners, data copy, device, and settings in every file.
    compared = [
        {
            "runners": sorted(s["runners"]),
            "data": s["provenance"].get("data"),
            "device": s["device"],
            "quick": s["quick"],
            "fit_overrides": s["fit_overrides"],
        }
        for s in sources
    ]
    for field in compared[0]:
        values = [c[field] for c in compared]
        if any(v != values[0] for v in values):
            raise ValueError(f"the files differ in their {field}: {values}; merge only runs of the same comparison")
    prov = finish(provenance(None))
    # The merge's own command and commit; machine and load are each source's (under sources).
    for key in [k for k in prov if k.startswith("load_average")]:
        prov[key] = None
    prov |= {
        "data": sources[0]["provenance"].get("data"),
        "machine_busy": any(s["provenance"].get("machine_busy") for s in sources),
    }
    runs.sort(key=lambda r: r["seed"])  # within a seed the order each file ran them in
    return {
        "provenance": prov,
        "meta": {
            "merged": True,
            "quick": sources[0]["quick"],
            "sections": ["time_to_accuracy"],
            "complete": all(s["complete"] for s in sources),
        },
        "sources": sources,
        "time_to_accuracy": {
            "runners": sources[0]["runners"],
            "seeds": sorted({r["seed"] for r in runs}),
            "device": sources[0]["device"],
            "order": "as each source ran it (see sources)",
            "runs": runs,
            "summary": compare_to_baseline(runs),
        },
    }
