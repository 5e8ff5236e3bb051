"""The speed benchmarks, each a ratio of two things measured in the same run: the data loaders, the
Lightning overhead over a bare loop, and time to accuracy. ``bench.py`` runs and reports them."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_lightning.tools.bench_memory import MEMORY_RUNS


#: What each ratio should reach. Reported next to the measurement, never asserted.
TARGETS: dict[str, dict[str, Any]] = {
    "data": {"speedup": 20.0, "where": "2-core CPU"},
    # Framework time must not show on a short step: at most 0.3 ms a step (simple_cnn, batch 32:
    # the bare step's time is in the results as bare_step_ms).
    "overhead_cpu": {"ratio": 0.95, "framework_ms": 0.3, "where": "CPU, simple_cnn, batch 32 (short steps)"},
    "overhead_gpu": {"ratio": 0.90, "where": "GPU, fastnet, batch 1024"},
    # Against airbench94 run in the same benchmark, on the same machine and images: at most its
    # time, and no more than 0.2 points below its accuracy (about one seed-to-seed spread).
    "tta": {"time_ratio": 1.0, "accuracy_difference_points": -0.2, "where": "same run as airbench94"},
}


@dataclass
class BenchConfig:
    """Settings of one benchmark run; ``--quick`` swaps in the small values of ``quick()``."""

    data_dir: str = "data"
    val_size: int = 5000
    quick: bool = False
    accelerator: str = "auto"
    # data
    data_batch_size: int = 256
    baseline_batches: int = 30  # the PIL baseline is slow: a few thousand images suffice
    # overhead
    overhead_arch: str | None = None  # default: simple_cnn on a CPU, fastnet on a GPU
    overhead_batch_size: int | None = None  # default: 32 on a CPU, 1024 on a GPU
    warmup_steps: int = 10
    timed_steps: int = 200
    repeats: int = 5
    # time to accuracy: "airbench94" (the installed package) or a recipe file, alternated per seed
    runners: list[str] = field(
        default_factory=lambda: ["airbench94", "configs/fastnet.yaml", "configs/fastnet_muon.yaml"]
    )
    seeds: list[int] = field(default_factory=lambda: [0])
    tta_overrides: list[str] = field(default_factory=list)
    # memory
    memory_steps: int = 15
    memory_loaders: list[str] = field(default_factory=lambda: list(MEMORY_RUNS))
    work_dir: str | None = None

    @classmethod
    def quick_config(cls, **kw: Any) -> "BenchConfig":
        """Seconds-long settings on a synthetic image folder (``data_dir`` is replaced)."""
        defaults = dict(
            quick=True, val_size=16, data_batch_size=32, baseline_batches=4, overhead_arch="simple_cnn",
            overhead_batch_size=16, warmup_steps=1, timed_steps=3, repeats=1, memory_steps=3,
            memory_loaders=["torchvision_2_workers", "torchvision_0_workers"],
            tta_overrides=[
                "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--data.batch_size=32",
                '--model.arch_kwargs={"widths": [16, 32, 32]}',
            ],
        )  # fmt: skip
        defaults.update(kw)
        return cls(**defaults)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)




def _datamodule(cfg: BenchConfig, **kw: Any):
    from cifar_lightning.data import CIFAR10DataModule

    dm = CIFAR10DataModule(data_dir=cfg.data_dir, download=False, val_size=cfg.val_size, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _images_per_second(
    loader, max_batches: int | None, device: torch.device, skip: int = 1
) -> tuple[float, int, float]:
    """Iterate ``loader``; time the batches after the first ``skip``.

    Skipping the first batch leaves out worker start-up; a loader with workers should also skip
    the batches they prefetched meanwhile (2 per worker), which would otherwise come for free.
    """
    it = iter(loader)
    for _ in range(skip):
        next(it)
    _sync(device)
    start, images, batches = time.perf_counter(), 0, 0
    for x, _ in it:
        images += len(x)
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    _sync(device)
    seconds = time.perf_counter() - start
    return images / seconds, images, seconds


# ---------------------------------------------------------------------------------------------
# 1. Data: our tensor loader vs ImageFolder + PIL transforms + 2 workers
# ---------------------------------------------------------------------------------------------


def bench_data(cfg: BenchConfig) -> dict[str, Any]:
    """Images/s of three loaders over the same training images, and the speed-ups."""
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    from cifar_lightning.constants import CIFAR10_MEAN, CIFAR10_STD

    device = _device(cfg.accelerator)
    bs = cfg.data_batch_size
    tensor_dm = _datamodule(cfg, loader="tensor", augment="standard", batch_size=bs)
    # As under a Trainer: on a GPU the array moves there once and batches are made there.
    loader = tensor_dm.tensor_loader(tensor_dm.train_set, train=True, device=device, seed=0)
    ours = _images_per_second(loader, None, device)

    # The same decoded arrays through torchvision transforms, one image at a time, in 2 workers.
    pil_dm = _datamodule(cfg, loader="torchvision", augment="standard", batch_size=bs, num_workers=2)
    prefetched = 1 + 2 * 2
    ours_pil = _images_per_second(pil_dm.train_dataloader(), cfg.baseline_batches, torch.device("cpu"), prefetched)

    # The tutorial way: decode every JPEG/PNG with PIL every epoch.
    tf = T.Compose([
        T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD),
    ])  # fmt: skip
    folder = torchvision.datasets.ImageFolder(str(tensor_dm.source.root / "train"), transform=tf)
    baseline_loader = DataLoader(folder, batch_size=bs, shuffle=True, num_workers=2)
    baseline = _images_per_second(baseline_loader, cfg.baseline_batches, torch.device("cpu"), prefetched)

    def row(result):
        return {"images_per_s": round(result[0], 1), "images": result[1], "seconds": round(result[2], 3)}

    return {
        "batch_size": bs,
        "device": str(device),
        "augment": "standard (zero-pad 4, random crop, flip) + normalise",
        "tensor_loader": row(ours),
        "array_pil_loader_2_workers": row(ours_pil),
        "imagefolder_pil_2_workers": row(baseline),
        "speedup": round(ours[0] / baseline[0], 2),
        "speedup_over_array_pil": round(ours[0] / ours_pil[0], 2),
        "target_speedup": TARGETS["data"]["speedup"],
    }


# ---------------------------------------------------------------------------------------------
# 2. Overhead: Trainer.fit vs a bare loop, step by step
# ---------------------------------------------------------------------------------------------


class BareLoop:
    """The same network, data path, loss, optimizer and per-step schedule as a fit, no framework.

    ``step()`` runs one whole training step, fetching its batch included. The network is built
    with the same seed as the fit's, from the same registry.
    """

    def __init__(self, cfg: BenchConfig, arch: str, bs: int, device: torch.device, steps: int) -> None:
        from types import SimpleNamespace

        from cifar_lightning.module import ClassifierModule
        from cifar_lightning.optim import build_optimizer, build_scheduler

        dm = _datamodule(cfg, loader="tensor", augment="standard", batch_size=bs)
        self.batches = iter(dm.tensor_loader(dm.train_set, train=True, device=device, seed=1))
        torch.manual_seed(0)
        # The module with its defaults, for the same network, optimizer and schedule as the fit's.
        module = ClassifierModule(arch=arch, num_classes=dm.num_classes, class_names=dm.class_names, lr=OVERHEAD_LR)
        self.model = module.model.to(device).train()
        init = getattr(self.model, "init_from_data", None)
        if callable(init):
            init(dm.sample_train_images(5000).to(device))
        self.opt = build_optimizer(self.model, module.hparams)
        schedule_length = SimpleNamespace(
            estimated_stepping_batches=steps, num_training_batches=steps, accumulate_grad_batches=1, max_epochs=1
        )
        configured = build_scheduler(self.opt, module.hparams, schedule_length)
        self.sched = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None

    def step(self) -> None:
        import torch.nn.functional as F

        x, y = next(self.batches)
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()


class _BlockTimer:
    """A Lightning callback timing the steps after ``warmup``, from the start of the first timed step
    to the end of the last (every other callback's hooks for those steps included: it runs last)."""

    def __new__(cls, warmup: int, steps: int, device: torch.device, out: dict[str, float]):
        from lightning.pytorch.callbacks import Callback

        class _Timer(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == warmup:
                    _sync(device)
                    out["start"] = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx == warmup + steps - 1:
                    _sync(device)
                    out["seconds"] = time.perf_counter() - out["start"]

        return _Timer()


#: A learning rate small enough for the overhead networks to stay finite, so both sides time
#: ordinary arithmetic rather than NaNs.
OVERHEAD_LR = 0.01

#: Overhead variants: what each Trainer carries beyond the bare loop.
OVERHEAD_VARIANTS = {
    "defaults": "the CLI's defaults: progress bar, model summary, LR monitor, checkpointing, CSV logger, metrics",
    "no_progress_bar": "the defaults without progress bar and model summary",
    "bare_trainer": "no logger, no callbacks (the module's own metrics and logging calls stay)",
}


def _overhead_args(cfg: BenchConfig, arch: str, bs: int, steps: int, out: Path, variant: str) -> list[str]:
    args = [
        f"--data.data_dir={cfg.data_dir}", "--data.download=false", "--data.loader=tensor",
        f"--data.val_size={cfg.val_size}",
        f"--data.batch_size={bs}", f"--model.arch={arch}", f"--model.lr={OVERHEAD_LR}", "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={steps}", "--trainer.limit_val_batches=0",
        f"--trainer.accelerator={cfg.accelerator}", "--trainer.devices=1",
        f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
    ]  # fmt: skip
    if variant in ("no_progress_bar", "bare_trainer"):
        args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if variant == "bare_trainer":
        args += ["--trainer.logger=false"]
    return args


def _timed_fit(cfg: BenchConfig, arch: str, bs: int, device: torch.device, variant: str) -> float:
    """Seconds of ``cfg.timed_steps`` steps of one Trainer.fit of ``variant``, after its warm-up."""
    import warnings

    from cifar_lightning.cli import CifarCLI

    warnings.filterwarnings("ignore", message=".*could not find the monitored key.*")
    steps = cfg.warmup_steps + cfg.timed_steps
    timing: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as out:
        cli = CifarCLI(args=_overhead_args(cfg, arch, bs, steps, Path(out), variant), run=False)
        if variant == "bare_trainer":
            cli.trainer.callbacks = []  # the CLI's own callbacks (LR monitor, ...) too
        cli.trainer.callbacks.append(_BlockTimer(cfg.warmup_steps, cfg.timed_steps, device, timing))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if "seconds" not in timing:
        raise RuntimeError(f"the training set has fewer than {steps} batches of {bs}")
    return timing["seconds"]


def _timed_bare(cfg: BenchConfig, arch: str, bs: int, device: torch.device) -> float:
    """Seconds of ``cfg.timed_steps`` steps of the bare loop, after the same warm-up."""
    bare = BareLoop(cfg, arch, bs, device, cfg.warmup_steps + cfg.timed_steps)
    for _ in range(cfg.warmup_steps):
        bare.step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(cfg.timed_steps):
        bare.step()
    _sync(device)
    return time.perf_counter() - start


def bench_overhead(cfg: BenchConfig) -> dict[str, Any]:
    """Framework time per step: Trainer.fit of each variant against a bare loop, in alternating blocks.

    Each repeat times a block of ``timed_steps`` steps of the bare loop beside each variant's
    block, each after its own warm-up, in ABBA order (even repeats: bare then fit, variants in
    order; odd repeats: fit then bare, variants reversed), so slow changes of the machine's load
    reach both sides of a pair and no side always goes first. Per variant: the median
    over repeats of (fit block - bare block) / steps, the framework's milliseconds per step, and
    of bare / fit, the ratio. On steps of 10-50 ms (a small network and batch on a CPU) a
    millisecond of framework shows; on steps of seconds it cannot (``steps_per_s`` says which).
    """
    device = _device(cfg.accelerator)
    gpu = device.type == "cuda"
    arch = cfg.overhead_arch or ("fastnet" if gpu else "simple_cnn")
    bs = cfg.overhead_batch_size or (1024 if gpu else 32)
    times: dict[str, list[float]] = {v: [] for v in OVERHEAD_VARIANTS} | {f"bare_beside_{v}": [] for v in OVERHEAD_VARIANTS}
    for r in range(cfg.repeats):
        # ABBA: odd repeats time the fit first and the variants in reverse, so neither side of a
        # pair nor any variant always runs first.
        order = list(OVERHEAD_VARIANTS) if r % 2 == 0 else list(OVERHEAD_VARIANTS)[::-1]
        for v in order:
            pair = [("bare", lambda: _timed_bare(cfg, arch, bs, device)), ("fit", lambda v=v: _timed_fit(cfg, arch, bs, device, v))]
            for side, timed in pair if r % 2 == 0 else pair[::-1]:
                times[f"bare_beside_{v}" if side == "bare" else v].append(timed())
    n = cfg.timed_steps
    ms = {v: float(np.median([1e3 * (f - b) / n for f, b in zip(times[v], times[f"bare_beside_{v}"])]))
          for v in OVERHEAD_VARIANTS}  # fmt: skip
    ratio = {v: float(np.median([b / f for f, b in zip(times[v], times[f"bare_beside_{v}"])])) for v in OVERHEAD_VARIANTS}
    bare_step = float(np.median([t for v in OVERHEAD_VARIANTS for t in times[f"bare_beside_{v}"]])) / n
    target = TARGETS["overhead_gpu" if gpu else "overhead_cpu"]
    return {
        "arch": arch,
        "batch_size": bs,
        "device": str(device),
        "method": "alternating blocks, ABBA: bare loop and one variant's Trainer.fit per pair; medians over repeats",
        "met": bool(ratio["defaults"] >= target["ratio"]
                    and (target.get("framework_ms") is None or ms["defaults"] <= target["framework_ms"])),  # fmt: skip
        "variants": OVERHEAD_VARIANTS,
        "timed_steps": n,
        "warmup_steps": cfg.warmup_steps,
        "repeats": cfg.repeats,
        "bare_step_ms": round(1e3 * bare_step, 3),
        "steps_per_s": {"bare_loop": round(1 / bare_step, 2),
                        **{v: round(n / float(np.median(times[v])), 2) for v in OVERHEAD_VARIANTS}},  # fmt: skip
        "block_seconds": {k: [round(t, 4) for t in ts] for k, ts in times.items()},
        "framework_ms_per_step": {v: round(x, 3) for v, x in ms.items()},
        "ratio": round(ratio["defaults"], 4),
        "ratio_no_progress_bar": round(ratio["no_progress_bar"], 4),
        "ratio_bare_trainer": round(ratio["bare_trainer"], 4),
        "target_ratio": target["ratio"],
        "target_framework_ms": target.get("framework_ms"),
        "target_where": target["where"],
    }
