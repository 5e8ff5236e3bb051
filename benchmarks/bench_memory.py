"""The memory benchmark: peak proportional set size (PSS) of a CPU fit with DataLoader workers, main
and worker processes summed, and how much of the dataset the workers hold privately (a copy per
worker would show as about one dataset each). Linux only: it reads ``/proc``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from benchmarks import child_env
from cifar_lightning.report import write_report

#: The CPU fits of the memory section: (loader, DataLoader workers).
MEMORY_RUNS = {
    "torchvision_2_workers": ("torchvision", 2),
    "torchvision_0_workers": ("torchvision", 0),
    "tensor": ("tensor", 0),
}


def _smaps_rollup(pid: int) -> dict[str, int] | None:
    """kB fields of /proc/<pid>/smaps_rollup (Rss, Pss, Private_Clean, ...), None if gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name.strip()] = int(parts[0])
    return fields


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class MemorySampler(threading.Thread):
    """Polls the PSS/RSS of a process and its descendants; keeps the sample with the largest PSS."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak: dict[str, float] = {}
        self.max_workers = 0
        self._stop_event = threading.Event()

    def sample(self) -> dict[str, float] | None:
        main = _smaps_rollup(self.pid)
        if main is None:
            return None
        workers = [m for m in map(_smaps_rollup, _descendants(self.pid)) if m]
        everything = [main, *workers]
        self.max_workers = max(self.max_workers, len(workers))
        mb = 1 / 1024
        return {
            "pss_total_mb": sum(m.get("Pss", 0) for m in everything) * mb,
            "rss_total_mb": sum(m.get("Rss", 0) for m in everything) * mb,
            "main_pss_mb": main.get("Pss", 0) * mb,
            "workers_pss_mb": sum(m.get("Pss", 0) for m in workers) * mb,
            "workers_private_mb": sum(m.get("Private_Clean", 0) + m.get("Private_Dirty", 0) for m in workers) * mb,
            "workers": len(workers),
        }

    def run(self) -> None:
        while not self._stop_event.is_set():
            s = self.sample()
            if s and s["pss_total_mb"] > self.peak.get("pss_total_mb", -1):
                self.peak = s
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _mappings(pid: int) -> list[tuple[int, int, dict[str, int]]]:
    """(start, end, kB fields) of every mapping in /proc/<pid>/smaps."""
    out = []
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return out
    start = end = 0
    fields: dict[str, int] = {}
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            if fields:
                out.append((start, end, fields))
            lo, hi = head.split("-")
            start, end, fields = int(lo, 16), int(hi, 16), {}
        elif head.endswith(":") and len(line.split()) >= 2 and line.split()[1].isdigit():
            fields[head[:-1]] = int(line.split()[1])
    if fields:
        out.append((start, end, fields))
    return out


def dataset_sharing(pid: int, address: int, nbytes: int) -> dict[str, float]:
    """How the pages of the array at ``address`` are held by ``pid`` and its descendants (MB).

    ``workers_private_mb`` counts the array's pages that some worker holds a copy of its own: 0
    when every worker reads the parent's pages, about the array's size per copy otherwise.
    """
    result = {"workers": 0, "workers_rss_mb": 0.0, "workers_private_mb": 0.0, "main_rss_mb": 0.0}
    for who, p in [("main", pid)] + [("workers", c) for c in _descendants(pid)]:
        for lo, hi, f in _mappings(p):
            overlap = min(hi, address + nbytes) - max(lo, address)
            if overlap > 0:
                # smaps counts whole mappings: a large array has one to itself (share = 1), a small
                # one shares the heap with other data, so its pages are prorated (approximate).
                share = overlap / (hi - lo)
                result[f"{who}_rss_mb"] += share * f.get("Rss", 0) / 1024
                if who == "workers":
                    private = f.get("Private_Clean", 0) + f.get("Private_Dirty", 0)
                    result["workers_private_mb"] += share * private / 1024
        result["workers"] += who == "workers"
    return {k: round(v, 1) for k, v in result.items()}


def memory_child() -> None:
    """Entry of the memory section's child process: a CLI fit that reports how the dataset is held.

    ``sys.argv[1]`` is the JSON file to write; the rest are CLI arguments. In the middle of
    training, once the DataLoader workers have read batches, it records ``dataset_sharing``.
    """
    import warnings

    from lightning.pytorch.callbacks import Callback

    from benchmarks.fitting import build_fit

    warnings.filterwarnings("ignore")  # the probe's output is its report; its log is for failures
    report, args = Path(sys.argv[1]), sys.argv[2:]

    class _Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == max(1, int(trainer.num_training_batches) // 2):
                images = trainer.datamodule.train_set.images
                address = images.__array_interface__["data"][0]
                sharing = dataset_sharing(os.getpid(), address, images.nbytes)
                write_report(sharing | {"dataset_mb": round(images.nbytes / 2**20, 1)}, report)

    # A user's fit, its checkpoints included: their memory counts.
    cli = build_fit(overrides=args, checkpoints=True, callbacks=[_Probe()])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def _measure_fit_memory(cfg: Any, run_name: str, out: Path) -> dict[str, Any]:
    """A CPU fit (the CLI's) in a child process: peak PSS of its process tree, dataset sharing."""
    arch = cfg.overhead_arch or "resnet20"
    loader, workers = MEMORY_RUNS[run_name]
    probe = out / f"memory-{run_name}.json"
    args = [
        sys.executable,
        "-c",
        "from benchmarks.bench_memory import memory_child; memory_child()",
        str(probe),
        f"--data.data_dir={cfg.data_dir}",
        "--data.download=false",
        f"--data.loader={loader}",
        f"--data.num_workers={workers}",
        f"--data.val_size={cfg.val_size}",
        f"--data.batch_size={cfg.data_batch_size}",
        f"--model.arch={arch}",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={cfg.memory_steps}",
        "--trainer.limit_val_batches=2",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
    ]
    log = out / f"memory-{run_name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=child_env())
        sampler = MemorySampler(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.stop()
    if code != 0 or not probe.is_file():
        raise RuntimeError(f"the memory-benchmark fit failed ({code}); its log ends:\n{log.read_text()[-2000:]}")
    peak = {k: round(v, 1) if isinstance(v, float) else v for k, v in sampler.peak.items()}
    return peak | {"max_workers_seen": sampler.max_workers, "dataset": json.loads(probe.read_text())}


def bench_memory(cfg: Any) -> dict[str, Any]:
    """Peak memory of CPU fits with 2 and 0 DataLoader workers (and with the tensor loader).

    PSS splits every shared page between the processes that map it, so the sum over the process
    tree is the physical memory the fit uses. Each DataLoader worker is a forked Python process
    that soon holds some tens of MB of its own (the interpreter's objects it touches, its
    allocator arenas): that is ``workers_extra_mb``. Whether the dataset is held once is read off
    the dataset's own pages: the workers map them (``workers_rss_mb``) without owning a copy
    (``dataset_copies_in_workers``, 0 when shared, 1 per copy otherwise).
    """
    from cifar_lightning.data import CIFAR10DataModule

    dm = CIFAR10DataModule(data_dir=cfg.data_dir, download=False, val_size=cfg.val_size, loader="tensor")
    dm.prepare_data()  # decodes and caches before the children start
    dm.setup("fit")
    dataset_mb = dm.train_set.images.nbytes / 2**20
    with tempfile.TemporaryDirectory() as out:
        runs = {name: _measure_fit_memory(cfg, name, Path(out)) for name in cfg.memory_loaders}
    two, none = runs["torchvision_2_workers"], runs["torchvision_0_workers"]
    return {
        "dataset_mb": round(dataset_mb, 1),
        "arch": cfg.overhead_arch or "resnet20",
        "batch_size": cfg.data_batch_size,
        **{name: runs.get(name) for name in MEMORY_RUNS},
        "workers_extra_mb": round(two["pss_total_mb"] - none["pss_total_mb"], 1),
        "workers_extra_over_dataset": round((two["pss_total_mb"] - none["pss_total_mb"]) / dataset_mb, 3),
        "dataset_copies_in_workers": round(two["dataset"]["workers_private_mb"] / dataset_mb, 3),
        "dataset_mapped_by_workers_mb": two["dataset"]["workers_rss_mb"],
    }
