"""The Trainer of every run: Lightning's, with ``precision="auto"`` as its default.

``auto`` is bf16 mixed precision where the hardware computes bf16 natively, else 32-bit:

- a CUDA device of compute capability 8.0 or newer (Ampere on): ``bf16-mixed``;
- a CPU whose flags include ``avx512_bf16`` or ``amx_bf16`` (x86), or ``bf16`` (Arm): ``bf16-mixed``.
  Without them autocast emulates bf16 and is many times slower than fp32 (a 2-core Zen 2 ran a
  conv2d in 542 ms against 21 ms: pytorch/pytorch#118499), so it is never chosen there;
- anything else (Apple's MPS, a CPU whose flags cannot be read): ``32-true``.

Nothing is guessed from a CPU's name: the flags are read from ``/proc/cpuinfo``. The choice and
its reason are printed when the trainer is built and kept on it (``precision_reason``), and the
resolved value is what ``--print_config``, the run's ``config.yaml`` and its report record.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

#: CPU flags that mean native bf16 arithmetic: AVX-512 BF16 and AMX (x86), FEAT_BF16 (Arm).
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

PrecisionInput = Optional[Union[_PRECISION_INPUT, Literal["auto"]]]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them (``flags`` on x86, ``Features`` on Arm); None
    where they cannot be read (another operating system)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def training_device(accelerator: Any = "auto") -> str:
    """``cuda``, ``mps`` or ``cpu``: where a trainer with ``accelerator`` runs."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return "cuda"
    if name == "mps" or (name == "auto" and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


def native_bf16(device: str) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and why (or why not), in a few words."""
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) >= (8, 0):
            return True, f"CUDA device of compute capability {major}.{minor} computes bf16 natively"
        return False, f"CUDA device of compute capability {major}.{minor} (bf16 needs 8.0 or newer)"
    if device == "mps":
        return False, "Apple MPS: bf16 is not chosen by default"
    flags = cpu_flags()
    if flags is None:
        return False, "the CPU's flags cannot be read here, so native bf16 is not assumed"
    found = [f for f in NATIVE_BF16_CPU_FLAGS if f in flags]
    if found:
        return True, f"this CPU computes bf16 natively: {', '.join(found)} among its flags"
    return False, "this CPU has no native bf16: none of avx512_bf16, amx_bf16, bf16 among its flags"


def resolve_precision(precision: Any, accelerator: Any = "auto") -> tuple[Any, str]:
    """``(precision for Lightning, why)``: ``auto`` decided as the module says; any other value
    is kept, with a reason that says so."""
    device = training_device(accelerator)
    if precision is None or str(precision) != "auto":
        return precision, "as asked"
    native, why = native_bf16(device)
    return ("bf16-mixed" if native else "32-true"), f"auto: {why}"


class NoProfiler(PassThroughProfiler):
    """Lightning's profiler for runs that profile nothing, with one context object for every action.

    Lightning wraps each hook of each callback in ``trainer.profiler.profile(name)``; its default
    profiler does nothing there, yet builds a generator-based context manager each time: about 80
    of them a training step with the default callbacks, which showed as Python time of every step
    (``benchmarks/cpu.json``, overhead). One reusable ``nullcontext`` does the same nothing.
    """

    _NOTHING = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._NOTHING


class Trainer(pl.Trainer):
    """``lightning.pytorch.Trainer`` whose ``precision`` defaults to ``"auto"`` (see the module),
    and which takes ``NoProfiler`` when no profiler is asked for.

    An explicit ``bf16`` precision on a CPU without native bf16 runs, with one warning that says
    it will be slow and why.
    """

    def __init__(self, *args: Any, precision: PrecisionInput = "auto", **kwargs: Any) -> None:
        resolved, reason = resolve_precision(precision, kwargs.get("accelerator", "auto"))
        device = training_device(kwargs.get("accelerator", "auto"))
        if reason == "as asked" and "bf16" in str(resolved) and device == "cpu":
            native, why = native_bf16(device)
            if not native:
                rank_zero_warn(
                    f"--precision {resolved} on a CPU without native bf16 ({why}): autocast emulates "
                    "bf16 there and trains several times slower than 32-true. Pass --precision 32-true "
                    "(or leave it at auto) unless you measure otherwise."
                )
        if kwargs.get("profiler") is None:
            kwargs["profiler"] = NoProfiler()
        super().__init__(*args, precision=resolved, **kwargs)
        #: Why this precision: ``auto: ...`` with the hardware's reason, or ``as asked``.
        self.precision_reason = reason
        if reason != "as asked":
            rank_zero_info(f"precision {self.precision} ({reason})")
