"""scripts/bench.py --quick: every section runs end to end on tiny data and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cifar_lightning.tools.bench import main, summary_rows
from cifar_lightning.tools.bench_memory import MemorySampler
from cifar_lightning.tools.bench_speed import BenchConfig
from conftest import REPO


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_quick_bench_writes_its_json(tmp_path, capsys):
    # In-process, every section but memory, whose two child fits take most of a minute (the slow
    # test below runs them all through scripts/bench.py).
    out = tmp_path / "quick.json"
    returned = main(["--quick", "--sections", "data,overhead,tta", "--output", str(out)])
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["meta"]["quick"] is True and results["meta"]["cpu_cores"] >= 1
    check_data(results["data"])
    check_overhead(results["overhead"])
    check_tta(results["tta"])
    printed = capsys.readouterr().out
    assert "time to accuracy" in printed and "overhead" in printed  # the rich table


@pytest.mark.slow
def test_quick_bench_every_section(tmp_path):
    out = tmp_path / "quick.json"
    proc = run_bench("--quick", "--sections", "all", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    check_data(results["data"])
    check_overhead(results["overhead"])
    check_tta(results["tta"])
    check_memory(results["memory"])


def check_data(data):
    for key in ("tensor_loader", "array_pil_loader_2_workers", "imagefolder_pil_2_workers"):
        assert data[key]["images_per_s"] > 0
    assert data["speedup"] == pytest.approx(
        data["tensor_loader"]["images_per_s"] / data["imagefolder_pil_2_workers"]["images_per_s"], rel=0.02
    )
    assert data["target_speedup"] == 20


def check_overhead(overhead):
    assert set(overhead["steps_per_s"]) == {"bare_loop", "defaults", "no_progress_bar", "bare_trainer"}
    assert overhead["ratio"] > 0 and overhead["target_ratio"] == 0.95


def check_tta(tta):
    assert 0 <= tta["mean_test_acc"] <= 1 and tta["runs"][0]["tta"] == "flip_translate"
    assert tta["runs"][0]["epochs"] == 1 and tta["mean_seconds"] > 0
    assert tta["target_accuracy"] == 0.9045 and tta["target_seconds"] == 1706


def check_memory(memory):
    assert memory["torchvision_2_workers"]["max_workers_seen"] >= 2
    assert memory["torchvision_0_workers"]["workers"] == 0
    assert memory["torchvision_2_workers"]["pss_total_mb"] > 0 and "workers_extra_over_dataset" in memory


def test_memory_sampler_sums_a_process_tree():
    # A child that forks a grandchild, each then writing its own 64 MB: the sampler sees both.
    code = (
        "import os, time\n"
        "b = bytearray(64 * 2**20)\n"
        "pid = os.fork()\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        "time.sleep(1.5)\n"
        "if pid: os.waitpid(pid, 0)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    sampler = MemorySampler(proc.pid, interval=0.05)
    sampler.start()
    proc.wait()
    sampler.stop()
    assert sampler.max_workers == 1 and sampler.peak["workers"] == 1
    assert sampler.peak["pss_total_mb"] > 120 and sampler.peak["workers_private_mb"] > 60


def test_summary_rows_and_configs():
    assert summary_rows({"meta": {}}) == []
    quick = BenchConfig.quick_config(data_dir="x")
    assert quick.quick and quick.data_dir == "x" and quick.val_size < 100
    assert BenchConfig().seeds == [0] and BenchConfig().val_size == 5000
