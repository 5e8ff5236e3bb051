"""scripts/gpu_evidence.py: budgeted sections in their own processes, every outcome on file."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_ablation, gpu_evidence, gpu_sections
from benchmarks.gpu_sections import Context
from conftest import REPO

MACHINE_KEYS = {"gpu", "cpu", "python", "torch", "lightning", "torchvision", "torchmetrics"}


def run_quick(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_evidence.py"), "--quick", "--data-dir", "unused",
           "--output-dir", str(out), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)


def section_file(name: str) -> str:
    return f"{gpu_evidence.SECTIONS.index(name) + 1:02d}_{name}.json"


def load(out: Path, name: str) -> dict:
    return json.loads((out / section_file(name)).read_text())


def check_flat_and_few(out: Path) -> None:
    entries = list(out.iterdir())
    assert len(entries) <= 8 and all(p.is_file() for p in entries), sorted(p.name for p in entries)


@pytest.mark.slow
def test_quick_runs_every_section_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = run_quick(out, "--budget", "900")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_flat_and_few(out)
    expected = {section_file(n) for n in gpu_evidence.SECTIONS} | {"gpu_evidence.log", "summary.json"}
    assert {p.name for p in out.iterdir()} == expected
    for name in gpu_evidence.SECTIONS:
        record = load(out, name)
        assert record["section"] == name and record["status"] == "ok", record.get("output_tail")
        assert MACHINE_KEYS <= set(record["machine"]) and record["commands"] and record["headline"]
        # every fit wrote into the section's scratch folder, which is gone: no checkpoint is kept
        work = shlex.split(record["command"])[shlex.split(record["command"]).index("--work-dir") + 1]
        assert not Path(work).exists()
    tests = load(out, "gpu_tests")["results"]["pytest"]
    assert tests["tests"] > 20 and tests["skipped"] == tests["tests"] and tests["failed"] == 0  # no CUDA here
    assert any("needs CUDA" in reason for reason in tests["skip_reasons"])
    airbench = load(out, "airbench")["results"]
    assert airbench["airbench94"]["status"] == "skipped" and "CUDA" in airbench["airbench94"]["reason"]
    assert airbench["airbench_data"]["images"]["train"] > airbench["airbench_data"]["images"]["test"] > 0
    assert airbench["compile"]["pays"] is False  # never on a CPU
    for recipe in gpu_sections.AIRBENCH94_PAIRS:
        runs = airbench["runs"][recipe]
        assert len(runs) == gpu_sections.MIN_SEEDS and [r["seed"] for r in runs] == list(range(len(runs)))
        assert all(r["train_seconds"] > 0 and 0 <= r["tta_acc"] <= 1 and r["tta"] == "flip_translate" for r in runs)
        assert airbench["summary"][recipe]["tta_acc"]["n"] == len(runs)
    assert load(out, "resnet18_fast")["results"]["airbench95"]["status"] == "skipped"
    overhead = load(out, "overhead_data")["results"]
    assert overhead["overhead"]["ratio"] > 0 and overhead["data_all_cores"]["speedup"] > 0
    recipes = load(out, "recipes")["results"]
    assert {"resnet34_tutorial", "mynet_tutorial", "resnet20_paper"} <= set(recipes)
    assert all(0 <= r["test_acc"] <= 1 for r in recipes.values())
    ablation = load(out, "ablation")["results"]
    assert ablation["baseline"] == "standard" and set(ablation["runs"]) == set(gpu_ablation.QUICK_VARIANTS)
    assert set(gpu_ablation.QUICK_VARIANTS) <= set(gpu_ablation.VARIANTS)
    assert all(len(runs) == 1 and 0 <= runs[0]["tta_acc"] <= 1 for runs in ablation["runs"].values())
    assert ablation["summary"]["sam"]["time_ratio_to_baseline"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert {n: s["status"] for n, s in summary["sections"].items()} == dict.fromkeys(gpu_evidence.SECTIONS, "ok")
    assert "== done" in proc.stdout and "== done" in (out / "gpu_evidence.log").read_text()


def test_a_failed_section_is_recorded_and_the_next_one_runs(tmp_path):
    # A bad override makes resnet18_fast fail; recipes runs after it; a 1 s cap stops the ablation.
    out = tmp_path / "out"
    proc = run_quick(out, "--budget", "600", "--sections", "resnet18_fast,recipes,ablation",
                     "--extra", "resnet18_fast=--model.arch=no_such_net", "--cap", "ablation=1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_flat_and_few(out)
    failed = load(out, "resnet18_fast")
    assert failed["status"] == "failed" and failed["exit_code"] != 0
    assert "no_such_net" in failed["error"] and failed["output_tail"] and failed["traceback"]
    assert MACHINE_KEYS <= set(failed["machine"])
    assert load(out, "recipes")["status"] == "ok"
    stopped = load(out, "ablation")
    assert stopped["status"] == "timeout" and "time cap" in stopped["error"]
    assert not (out / section_file("airbench")).exists()  # not selected: nothing written for it
    assert "resnet18_fast: failed" in (out / "gpu_evidence.log").read_text()


def test_skip_done_skips_what_is_recorded_ok(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in gpu_evidence.SECTIONS:
        (earlier / section_file(name)).write_text(json.dumps({"section": name, "status": "ok", "results": {"x": 1}}))
    out = tmp_path / "out"
    proc = run_quick(out, "--budget", "600", "--skip-done", str(earlier))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in gpu_evidence.SECTIONS:
        record = load(out, name)
        assert record["status"] == "skipped" and "already recorded" in record["reason"]
        assert MACHINE_KEYS <= set(record["machine"])
    assert proc.stdout.count("already recorded") == len(gpu_evidence.SECTIONS)
    # Into the folder of the earlier results itself: they are left as they were.
    proc = run_quick(earlier, "--budget", "600", "--skip-done", str(earlier), "--sections", "airbench")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load(earlier, "airbench") == {"section": "airbench", "status": "ok", "results": {"x": 1}}


def test_a_tiny_budget_skips_what_does_not_fit(tmp_path):
    out = tmp_path / "out"
    proc = run_quick(out, "--budget", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_flat_and_few(out)
    for name in gpu_evidence.SECTIONS:
        record = load(out, name)
        assert record["status"] == "skipped" and "does not fit" in record["reason"] and not record["commands"]
        assert f"{name}: skipped, does not fit" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [s["section"] for s in summary["skipped"]] == list(gpu_evidence.SECTIONS)


def test_sections_costs_and_functions_agree():
    assert list(gpu_evidence.section_functions()) == list(gpu_evidence.SECTIONS)
    for cost in gpu_evidence.COSTS.values():
        assert 0 < cost.minimum <= cost.estimate <= cost.cap
    costs = {n: gpu_evidence.Cost(10, 20, 30) for n in "abc"}
    assert gpu_evidence._reserve(["a", "b", "c"], 25, costs) == 20  # what fits of the later minimums


def test_a_timed_fit_records_accuracy_and_training_seconds(tiny_folder, tmp_path):
    ctx = Context("airbench", str(tiny_folder), tmp_path / "work", tmp_path / "record.json", time.time() + 60, True)
    ctx.work_dir.mkdir()
    run = gpu_sections.timed_fit(ctx, REPO / "configs" / "fastnet_muon.yaml", 3, [])
    assert run["seed"] == 3 and run["steps"] == 2 and run["train_seconds"] > 0 and 0 <= run["tta_acc"] <= 1
    assert run["train_images"] == len(list((tiny_folder / "train").rglob("*.png")))  # all of them: no validation
    assert list(ctx.work_dir.iterdir()) == []  # the fit's folder is gone: no checkpoint kept
    assert "--data.val_size=0" in ctx.record["commands"][0]


AIRBENCH_PRINTS = """\
|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |
|       1  |      0  |      0.1230  |     0.5000  |   0.6000  |               |              1.5000  |
|          |      1  |      0.1100  |     0.6000  |   0.7000  |               |              2.9000  |
|          |   eval  |              |             |           |       0.9401  |              3.3000  |
"""


def test_airbench_runs_read_our_files_and_what_it_prints(tiny_folder, tmp_path, monkeypatch):
    seen = {}

    def train94(run=0):
        seen["files"] = sorted(p.name for p in Path("cifar10").iterdir())  # from its working folder
        seen["run"] = run
        print(AIRBENCH_PRINTS, end="")
        return torch.nn.Identity()

    fake = types.SimpleNamespace(train94=train94, CifarLoader=lambda *a, **k: None,
                                 evaluate=lambda net, loader, tta_level: 0.94012)  # fmt: skip
    monkeypatch.setitem(sys.modules, "airbench", fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    ctx = Context("airbench", str(tiny_folder), tmp_path / "work", tmp_path / "record.json", time.time() + 60)
    data = gpu_sections.airbench_data(ctx)
    train = torch.load(Path(data["folder"]) / "cifar10" / "train.pt")
    assert train["images"].dtype == torch.uint8 and tuple(train["images"].shape[1:]) == (32, 32, 3)
    assert train["labels"].dtype == torch.int64
    assert train["classes"] == sorted(p.name for p in (tiny_folder / "train").iterdir())  # CIFAR-10's order
    # The CPU harness's writer, in its one shuffled order: not the folder's class by class.
    assert data["train_order"].startswith("shuffled") and not torch.equal(train["labels"], train["labels"].sort().values)
    result = gpu_sections.airbench_run(ctx, "train94", 1)
    assert seen == {"files": ["test.pt", "train.pt"], "run": 1}
    assert result["train_seconds"] == 2.9 and result["epochs"] == 2  # its own count, before the TTA evaluation
    assert result["seconds_with_tta"] == 3.3 and result["tta_acc"] == 0.94012


def test_comparisons_and_headlines():
    runs = {"base": [{"tta_acc": 0.9, "train_seconds": 2.0, "wall_seconds": 3.0}],
            "ours": [{"tta_acc": 0.91, "train_seconds": 3.0, "wall_seconds": 5.0},
                     {"tta_acc": 0.93, "train_seconds": 5.0, "wall_seconds": 7.0}]}  # fmt: skip
    results = {"runs": runs, "baseline": "base"}
    lines = gpu_evidence.headline(results)
    ours = results["summary"]["ours"]
    assert ours["tta_acc"]["n"] == 2 and ours["time_ratio_to_baseline"] == 2.0
    assert ours["acc_diff_points_vs_baseline"] == pytest.approx(2.0)
    assert any(line.startswith("ours: 92.00 +- 1.41% (TTA), 2 seed(s)") and "x2.00 base's" in line for line in lines)
