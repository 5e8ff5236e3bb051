"""airbench94, the installed ``airbench`` package, run as the baseline of the time-to-accuracy section.

Nothing of airbench is copied here: ``run_airbench94`` imports the package and calls its own
``train94``. Only two things are swapped, and only while it runs:

- the device: ``Module.cuda`` keeps the network where it is, its data loader maps its tensors to
  the CPU instead of GPU 0, and its CUDA timing events become wall-clock events (``torch.cuda.Event``
  and ``torch.cuda.synchronize``);
- the precision: ``Module.half`` keeps fp32 weights and ``Tensor.half`` casts to fp32, since fp16
  arithmetic on a CPU is emulated and slow.

Its loader reads ``cifar10/{train,test}.pt`` from the working folder; ``write_airbench_data`` writes
them from the same decoded images our runs read (for the GPU command's airbench runs too). Its
time is its own count (the sum of its timed regions: whitening initialisation, training epochs
and the final TTA evaluation; per-epoch evaluations and data loading excluded), read from the
numbers it prints.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch


def airbench_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("airbench")
    except metadata.PackageNotFoundError:
        return None


#: The seed of the one order in which airbench's training file lists the images.
AIRBENCH_ORDER_SEED = 0


def write_airbench_data(data_dir: str | os.PathLike, folder: Path, cache_dir: str | None = None) -> dict[str, Any]:
    """``folder/cifar10/{train,test}.pt`` in airbench's format (uint8 NHWC images, int64 labels,
    class names), from the images ``data_dir`` holds: the one writer of airbench's files, for the
    CPU and the GPU harnesses. Returns the working folder airbench reads them from, the image
    counts, the class names and the training order.

    CIFAR-10's own files list the training images in a random class order, and airbench sets its
    whitening layer from the first 5,000; an image folder lists them class by class (all airplanes
    first). The training images are written in one shuffled order (``AIRBENCH_ORDER_SEED``), the
    same on every machine; the test images as they come.
    """
    from cifar_lightning.data.sources import load_split, resolve_source

    source = resolve_source(data_dir, download=False)
    out = Path(folder) / "cifar10"
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "test"):
        images, labels = load_split(source, split, cache_dir)
        if split == "train":
            order = np.random.default_rng(AIRBENCH_ORDER_SEED).permutation(len(images))
            images, labels = images[order], labels[order]
        torch.save(
            {
                "images": torch.from_numpy(np.ascontiguousarray(images)),
                "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)),
                "classes": list(source.class_names),
            },
            out / f"{split}.pt",
        )
        counts[split] = len(labels)
    return {
        "folder": str(folder),
        "images": counts,
        "classes": list(source.class_names),
        "train_order": f"shuffled, numpy default_rng({AIRBENCH_ORDER_SEED}).permutation",
    }


class _WallClockEvent:
    """``torch.cuda.Event(enable_timing=True)`` for CPU code: ``elapsed_time`` in milliseconds."""

    def __init__(self, enable_timing: bool = False, **_: Any) -> None:
        self.t: float | None = None

    def record(self, *_: Any) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_WallClockEvent") -> float:
        return 1e3 * (end.t - self.t)


@contextlib.contextmanager
def _on_cpu_in_fp32(utils_module) -> Iterator[None]:
    """While active: airbench's CUDA and fp16 calls run on the CPU in fp32 (see the module doc)."""
    saved = {
        "module_half": torch.nn.Module.half,
        "module_cuda": torch.nn.Module.cuda,
        "tensor_half": torch.Tensor.half,
        "event": torch.cuda.Event,
        "sync": torch.cuda.synchronize,
        "loader_defaults": utils_module.CifarLoader.__init__.__defaults__,
    }
    torch.nn.Module.half = lambda self: self
    torch.nn.Module.cuda = lambda self, device=None: self
    torch.Tensor.half = lambda self, *a, **k: self.float()
    torch.cuda.Event = _WallClockEvent
    torch.cuda.synchronize = lambda device=None: None
    # CifarLoader(..., gpu=0) maps its tensors to GPU 0; its last default becomes the CPU.
    utils_module.CifarLoader.__init__.__defaults__ = (*saved["loader_defaults"][:-1], "cpu")
    try:
        yield
    finally:
        torch.nn.Module.half = saved["module_half"]
        torch.nn.Module.cuda = saved["module_cuda"]
        torch.Tensor.half = saved["tensor_half"]
        torch.cuda.Event = saved["event"]
        torch.cuda.synchronize = saved["sync"]
        utils_module.CifarLoader.__init__.__defaults__ = saved["loader_defaults"]


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_airbench94(folder: Path, seed: int, quick: bool = False, device: torch.device | None = None) -> dict[str, Any]:
    """One run of airbench's ``train94`` in ``folder`` (which holds ``cifar10/*.pt``).

    ``quick``: a tiny synthetic folder cannot fill airbench's batch of 1,024, so the quick mode
    passes its own ``train_loader`` argument with batch 32 and one epoch (airbench's own options).
    """
    import airbench
    from airbench import utils as ab_utils
    from airbench.lib_airbench94 import hyp

    # On the device the other runners use: airbench's own CUDA + fp16 on a GPU, else the CPU in fp32.
    device_was_cpu = (device.type == "cpu") if device is not None else not torch.cuda.is_available()
    final: dict[str, Any] = {}
    print_details = ab_utils.print_training_details

    def capture(variables, is_final_entry):
        if is_final_entry:
            final.update(
                total_time_seconds=variables.get("total_time_seconds"),
                tta_val_acc=variables.get("tta_val_acc"),
                steps=variables.get("current_steps"),
                train_images=len(variables["train_loader"].images),
                batch_size=variables["batch_size"],
            )
        print_details(variables, is_final_entry)

    torch.manual_seed(seed)
    start = time.perf_counter()
    with _working_dir(folder), _on_cpu_in_fp32(ab_utils) if device_was_cpu else contextlib.nullcontext():
        ab_utils.print_training_details = capture
        try:
            kwargs: dict[str, Any] = {}
            if quick:
                kwargs["train_loader"] = ab_utils.CifarLoader(
                    "cifar10", train=True, batch_size=32, aug=hyp["aug"], altflip=True
                )
                kwargs["epochs"] = 1
            airbench.train94(**kwargs)
        finally:
            ab_utils.print_training_details = print_details
    wall = time.perf_counter() - start
    return {
        "runner": "airbench94",
        "seed": seed,
        "test_acc": round(float(final["tta_val_acc"]), 5),
        "seconds": round(float(final["total_time_seconds"]), 2),
        "seconds_counted_by": "airbench (whitening init + training + TTA evaluation)",
        "wall_seconds": round(wall, 2),
        "steps": int(final["steps"]),
        "batch_size": int(final["batch_size"]),
        "train_images": int(final["train_images"]),
        "images_seen": int(final["steps"]) * int(final["batch_size"]),
        "precision": "fp32" if device_was_cpu else "fp16 (airbench's own)",
        "device": "cpu" if device_was_cpu else "cuda",
        "airbench": airbench_version(),
    }
