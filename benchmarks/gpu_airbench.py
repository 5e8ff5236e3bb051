"""airbench's side of the GPU command: its data files (``bench_airbench``'s writer), its runs, and the
table it prints (``gpu_sections`` runs them beside our recipes)."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import time
from typing import Any

import torch

#: ``ctx`` below is a ``gpu_sections.Context`` (not imported: that module imports this one).
Context = Any


def _free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA


def airbench_data(ctx: Context) -> dict[str, Any]:
    """airbench's files in ``<work>/airbench/cifar10/``, written by ``bench_airbench.write_airbench_data``
    (the CPU harness's writer: the training images in its one seeded shuffled order), from the same
    image folder our fits read."""
    from benchmarks.bench_airbench import write_airbench_data

    start = time.perf_counter()
    written = write_airbench_data(ctx.data_dir, ctx.work_dir / "airbench")
    return written | {"seconds": round(time.perf_counter() - start, 2)}


def airbench_unavailable() -> str | None:
    """Why airbench cannot run here, or None."""
    if not torch.cuda.is_available():
        return "CUDA is not available: airbench runs on a GPU only (its loader and network call .cuda())"
    try:
        import airbench  # noqa: F401
    except ImportError as err:
        return f"airbench is not importable ({err}); install it with pip install airbench==0.1.8"
    return None


def parse_airbench_table(text: str) -> dict[str, Any]:
    """airbench's printed rows (run, epoch, train_loss, train_acc, val_acc, tta_val_acc,
    total_time_seconds): training seconds after the last epoch (its own CUDA-event count of the
    whitening init and the training steps), TTA accuracy and seconds with the TTA evaluation."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or not line.lstrip().startswith("|"):
            continue
        epoch, tta, total = cells[1], cells[5], cells[6]
        if epoch.isdigit() and total:
            out.update(epochs=int(epoch) + 1, train_seconds=float(total))
        elif epoch == "eval" and tta:
            out.update(tta_acc_printed=float(tta), seconds_with_tta=float(total))
    return out


def airbench_run(ctx: Context, name: str, seed: int) -> dict[str, Any]:
    """``airbench.<name>(run=seed)`` after ``torch.manual_seed(seed)``: what it prints, and our TTA
    evaluation of the network it returns (to 5 digits; it prints 4). Seed -1: ``warmupNN()``."""
    import airbench

    here = os.getcwd()
    os.chdir(ctx.work_dir / "airbench")  # its loader reads ./cifar10/{train,test}.pt
    try:
        kwargs = {"run": seed} if seed >= 0 else {}  # warmupNN() sets its own run=-1
        call = f"airbench.{name}({f'run={seed}' if kwargs else ''})"
        ctx.command(f"torch.manual_seed({max(seed, 0)}); {call}  # in a folder with cifar10/train.pt, test.pt")
        torch.manual_seed(max(seed, 0))
        # airbench sets this itself; set here too, as our fits set it, so both sides are explicit.
        torch.backends.cudnn.benchmark = True
        printed = io.StringIO()
        wall = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            net = getattr(airbench, name)(**kwargs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - wall
        print(printed.getvalue(), end="", flush=True)  # its table, into the log
        result = {
            "seed": seed,
            "wall_seconds": round(wall, 2),
            "precision": "fp16 (airbench's own .half())",
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        } | parse_airbench_table(printed.getvalue())
        if seed >= 0:
            test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
            result["tta_acc"] = round(airbench.evaluate(net, test, tta_level=2), 5)
    finally:
        os.chdir(here)
    del net
    _free_memory()
    print(f"{name} seed {seed}: " + json.dumps(result), flush=True)
    return result
