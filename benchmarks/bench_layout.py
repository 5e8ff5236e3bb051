"""The layout section: a training step of every network in channels-first (NCHW) against
channels-last memory, on the device and in the precision a default run uses.

Both layouts train the same network from the same seed on the same random batch, one step of each
in turn, so that the machine's drift reaches both alike. Per network: the median step of each, the
speed-up of channels-last (NCHW time / channels-last time) in each round, and a verdict: ``wins``
when channels-last is faster in at least three rounds in four, ``loses`` when it is faster in at
most one in four, else ``within noise``. Per family, the
networks' verdicts side by side: ``cifar_lightning.models.CHANNELS_LAST_CPU`` takes the families
where every network won on a CPU.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.bench_speed import BenchConfig, _device, _sync

#: The networks of ``--quick`` (small ones, one per family that is cheap on a CPU).
QUICK_NETWORKS = ("simple_cnn", "resnet20", "fastnet")


def _step_timer(name: str, channels_last: bool, batch: int, device: torch.device, autocast: torch.dtype | None):
    """A closure that runs and times one training step of ``name`` in the given layout."""
    from cifar_lightning.models import create_model

    torch.manual_seed(0)
    net = create_model(name).to(device).train()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2)).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - start

    return step


def verdict(speedups: list[float]) -> str:
    """``wins``, ``loses`` or ``within noise`` from channels-last's speed-up in each round."""
    faster = sum(s > 1.0 for s in speedups) / len(speedups)
    if faster >= 0.75:
        return "wins"
    if faster <= 0.25:
        return "loses"
    return "within noise"


def bench_layout(cfg: BenchConfig) -> dict[str, Any]:
    """Channels-last against NCHW, one training step of each in turn, for every registered network."""
    from cifar_lightning.models import list_models, model_info
    from cifar_lightning.trainer import resolve_precision

    device = _device(cfg.accelerator)
    precision, reason = resolve_precision("auto", cfg.accelerator)
    autocast = torch.bfloat16 if precision == "bf16-mixed" else None
    names = [n for n in QUICK_NETWORKS if n in list_models()] if cfg.quick else list_models()
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        steps = {
            layout: _step_timer(name, layout == "channels_last", cfg.layout_batch_size, device, autocast)
            for layout in ("nchw", "channels_last")
        }
        for step in steps.values():  # warm-up: allocator, kernels picked, first-call costs
            step()
        times: dict[str, list[float]] = {"nchw": [], "channels_last": []}
        for r in range(cfg.layout_rounds):
            order = ("nchw", "channels_last") if r % 2 == 0 else ("channels_last", "nchw")
            for layout in order:
                times[layout].append(steps[layout]())
        speedups = [a / b for a, b in zip(times["nchw"], times["channels_last"])]
        rows[name] = {
            "family": model_info(name).family,
            "nchw_ms": round(1e3 * float(np.median(times["nchw"])), 2),
            "channels_last_ms": round(1e3 * float(np.median(times["channels_last"])), 2),
            "speedup": round(float(np.median(speedups)), 3),
            "speedups": [round(s, 3) for s in speedups],
            "verdict": verdict(speedups),
        }
    families: dict[str, dict[str, str]] = defaultdict(dict)
    for name, row in rows.items():
        families[row["family"]][name] = row["verdict"]
    return {
        "device": str(device),
        "precision": precision,
        "precision_reason": reason,
        "batch_size": cfg.layout_batch_size,
        "rounds": cfg.layout_rounds,
        "method": "one training step of each layout in turn (the order alternating by round), same seed and "
        "batch; speed-up = NCHW step time / channels-last step time in the same round",
        "networks": rows,
        "families": dict(families),
        "families_that_win": sorted(f for f, v in families.items() if all(x == "wins" for x in v.values())),
    }
