"""Where a result came from: commit, command, machine, versions, data, date and load.

Every file written by the benchmark, reproduction, recipe-check and GPU harnesses carries
``provenance()`` under the key ``provenance``. Paths in it are relative to the repository or named
by role (the data copy by file name and sha256), never absolute, so a committed result says
nothing about the machine's folders (``tests/test_provenance.py`` checks every tracked file).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from benchmarks import REPO

#: Instruction-set flags that change CPU speed of convolutions and matrix products.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")

#: Packages whose versions a result depends on.
PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "numpy", "airbench")


#: Environment variables that change speed or results (allocator, threads, CUDA), recorded as set.
ENV_PREFIXES = ("MALLOC_", "OMP_", "MKL_", "KMP_", "CUDA_", "CUBLAS_", "PYTORCH_", "TORCH_", "CIFAR_LIGHTNING_")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.rstrip("\n") if out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """The commit checked out and the tracked files that differ from it (relative paths)."""
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    changed = _git("status", "--porcelain", "--untracked-files=normal")
    if changed is None:  # no git, or not a checkout: unknown, not clean
        return {"commit": commit, "uncommitted_changes": None, "changed_files": None}
    paths = sorted(line[3:] for line in changed.splitlines() if line.strip())
    return {"commit": commit, "uncommitted_changes": bool(paths), "changed_files": paths}


#: Folders of this repository: a path through one of them, in any checkout, is named from there.
REPO_FOLDERS = ("benchmarks", "configs", "scripts", "cifar_lightning", "tests", "docs", "notebooks")

_ABSOLUTE_PATH = re.compile(r"(?<![\w.~<>/-])(?:/[\w.+@-]+)+/?")


def describe_path(path: str | os.PathLike) -> str:
    """A path as it may be written into a committed file: relative to the repository when inside
    it (or inside one of its folders in another checkout), ``<site-packages>/...`` for installed
    packages, ``python`` for an interpreter, else by its role: the last component only
    (``<outside>/cifar10-jpeg.tar.gz``)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path.cwd() / p
    try:
        return p.resolve().relative_to(REPO).as_posix() or "."
    except ValueError:
        pass
    parts = p.parts
    hidden = [i for i, part in enumerate(parts) if part.startswith(".")]  # caches, virtual environments
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in REPO_FOLDERS and not any(h < i for h in hidden):
            return Path(*parts[i:]).as_posix()
        if parts[i] == "site-packages":
            return "<site-packages>/" + Path(*parts[i + 1 :]).as_posix() if i + 1 < len(parts) else "<site-packages>"
    if re.fullmatch(r"python[\d.]*", p.name):
        return "python"
    return f"<outside>/{p.name}"


def scrub_paths(text: str) -> str:
    """``text`` with every absolute path replaced by ``describe_path`` of it (for logs a result keeps)."""
    return _ABSOLUTE_PATH.sub(lambda m: describe_path(m.group(0).rstrip("/")), text)


def scrub(obj: Any) -> Any:
    """``scrub_paths`` over every string of a JSON-like object."""
    if isinstance(obj, str):
        return scrub_paths(obj)
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that made the result, ``python scripts/...`` with every path made relative."""
    argv = list(sys.argv if argv is None else argv)
    parts = ["python"]
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        if value and (i == 0 or value.startswith(("/", "~")) or (os.sep in value and Path(value).exists())):
            value = describe_path(value)
        value = scrub_paths(value)  # paths inside a value too (a note naming a file, a:/b)
        parts.append(f"{key}{eq}{value}")
    return shlex.join(parts)


@lru_cache(maxsize=None)
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_data(data_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The data copy by name, and by sha256 when it is one file (an archive)."""
    if data_dir is None:
        return None
    p = Path(data_dir).expanduser()
    out: dict[str, Any] = {"name": p.name}
    if p.is_file():
        out["sha256"] = file_sha256(str(p.resolve()))
    return out


def _cpu() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    mem_gib = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem_gib = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": model,
        "cpu_cores": os.cpu_count(),
        "cpu_flags": {f: f in flags for f in CPU_FLAGS} if flags else None,
        "memory_gib": mem_gib,
    }


def _gpu() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "count": torch.cuda.device_count(),
        "capability": f"{props.major}.{props.minor}",
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


class _LoadSampler:
    """The 1-minute load average every ``interval`` seconds while a run lasts (a daemon thread)."""

    def __init__(self, interval: float = 15.0) -> None:
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while True:
            value = load_average()
            if value is not None:
                self.samples.append(value)
            if self._stop.wait(interval):
                return

    def stop(self) -> list[float]:
        self._stop.set()
        return self.samples


_SAMPLERS: dict[str, _LoadSampler] = {}


def provenance(data_dir: str | os.PathLike | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything a reader needs to know where a result came from (call at the start of a run;
    ``finish`` adds the end time and load)."""
    import torch

    started = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    _SAMPLERS[started] = _LoadSampler()
    return {
        **git_state(),
        "command": command_line(argv),
        "machine": {**_cpu(), "gpu": _gpu(), "torch_threads": torch.get_num_threads(), "os": platform.system()},
        "versions": versions(),
        "environment": scrub({k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}),
        "data": describe_data(data_dir),
        "started": started,
        "load_average_1min_start": load_average(),
    }


def finish(prov: dict[str, Any], final: bool = True) -> dict[str, Any]:
    """``prov`` with the end time and the load over the run so far; a load above the core count
    marks a busy machine. ``final=False`` (a partial save) keeps sampling."""
    end = load_average()
    sampler = _SAMPLERS.pop(prov["started"], None) if final else _SAMPLERS.get(prov["started"])
    samples = ((sampler.stop() if final else list(sampler.samples)) if sampler else []) + (
        [end] if end is not None else []
    )
    cores = prov["machine"]["cpu_cores"] or 1
    peak = max(samples, default=None)
    return prov | {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min_end": end,
        "load_average_1min_max": peak,
        "load_average_1min_mean": round(sum(samples) / len(samples), 2) if samples else None,
        # A run's own threads load the machine up to its core count; more means other work ran.
        "machine_busy": peak is not None and peak > cores + 0.5,
    }
