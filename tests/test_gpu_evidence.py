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
from conftest import REPO

from benchmarks import gpu_ablation, gpu_compile, gpu_evidence, gpu_plan, gpu_sections
from benchmarks.gpu_plan import SECTIONS
from benchmarks.gpu_sections import Context
from cifar_lightning.errors import UserError

MACHINE_KEYS = {"gpu", "cpu", "python", "torch", "lightning", "torchvision", "torchmetrics"}


def run_quick(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "gpu_evidence.py"),
        "--quick",
        "--data-dir",
        "unused",
        "--output-dir",
        str(out),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)


def section_file(name: str) -> str:
    return f"{SECTIONS.index(name) + 1:02d}_{name}.json"


def load(out: Path, name: str) -> dict:
    return json.loads((out / section_file(name)).read_text())


def check_flat_and_few(out: Path) -> None:
    entries = list(out.iterdir())
    assert len(entries) <= 8 and all(p.is_file() for p in entries), sorted(p.name for p in entries)


@pytest.mark.slow
def test_quick_runs_every_section_end_to_end(tmp_path):
    # The default plan, then the other sections in a second run: each output folder comes back
    # from a GPU machine with at most 8 files.
    first, second = tmp_path / "first", tmp_path / "second"
    proc = run_quick(first, "--budget", "900")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    others = [n for n in SECTIONS if n not in gpu_plan.DEFAULT_SECTIONS]
    again = run_quick(second, "--budget", "900", "--sections", ",".join(others))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for out, names in ((first, gpu_plan.DEFAULT_SECTIONS), (second, others)):
        check_flat_and_few(out)
        assert {p.name for p in out.iterdir()} == {section_file(n) for n in names} | {
            "gpu_evidence.log",
            "summary.json",
        }
    for name in SECTIONS:
        out = first if name in gpu_plan.DEFAULT_SECTIONS else second
        record = load(out, name)
        allowed = {"gpu_tests": {"skipped"}, "compile_sweep": {"ok", "incomplete"}}.get(name, {"ok"})
        assert record["section"] == name and record["status"] in allowed, record.get("output_tail")
        assert MACHINE_KEYS <= set(record["machine"]) and record["commands"] and record["headline"]
        # every fit wrote into the section's scratch folder, which is gone: no checkpoint is kept
        work = shlex.split(record["command"])[shlex.split(record["command"]).index("--work-dir") + 1]
        assert not Path(work).exists()
    tests = load(first, "gpu_tests")
    pytest_run = tests["results"]["pytest"]
    assert pytest_run["tests"] > 10 and pytest_run["skipped"] == pytest_run["tests"] and pytest_run["failed"] == 0
    assert any("needs CUDA" in reason for reason in pytest_run["skip_reasons"])
    assert "ran no test" in tests["reason"] and "needs CUDA" in tests["reason"]  # not ok: skipped, and why
    airbench = load(first, "airbench")["results"]
    assert airbench["airbench94"]["status"] == "skipped" and "CUDA" in airbench["airbench94"]["reason"]
    assert airbench["airbench_data"]["images"]["train"] > airbench["airbench_data"]["images"]["test"] > 0
    assert airbench["compile"]["pays"] is False  # never on a CPU
    for recipe in gpu_sections.AIRBENCH94_PAIRS:
        runs = airbench["runs"][recipe]
        assert len(runs) == gpu_sections.MIN_SEEDS and [r["seed"] for r in runs] == list(range(len(runs)))
        assert all(r["train_seconds"] > 0 and 0 <= r["tta_acc"] <= 1 and r["tta"] == "flip_translate" for r in runs)
        assert airbench["summary"][recipe]["tta_acc"]["n"] == len(runs)
    overhead = load(first, "overhead_data")["results"]
    assert overhead["overhead"]["ratio"] > 0 and overhead["data_all_cores"]["speedup"] > 0
    sweep = load(first, "compile_sweep")["results"]
    compiled = [n for n, r in sweep["networks"].items() if r["status"] == "compiled"]
    assert sweep["backend"] == "eager" and compiled and all(sweep["networks"][n]["steps"] == 1 for n in compiled)
    assert (
        set(sweep["networks"]) | set(sweep["not_reached"])
        == set(sweep["order"])
        == set(gpu_compile.sweep_order(REPO / "configs"))
    )
    assert load(second, "resnet18_fast")["results"]["airbench95"]["status"] == "skipped"
    recipes = load(second, "recipes")["results"]
    assert {"resnet34_tutorial", "mynet_tutorial", "resnet20_paper"} <= set(recipes)
    assert all(0 <= r["test_acc"] <= 1 for r in recipes.values())
    ablation = load(second, "ablation")["results"]
    assert ablation["baseline"] == "standard" and set(ablation["runs"]) == set(gpu_ablation.QUICK_VARIANTS)
    assert set(gpu_ablation.QUICK_VARIANTS) <= set(gpu_ablation.VARIANTS)
    assert all(len(runs) == 1 and 0 <= runs[0]["tta_acc"] <= 1 for runs in ablation["runs"].values())
    assert ablation["summary"]["sam"]["time_ratio_to_baseline"] > 0
    summary = json.loads((first / "summary.json").read_text())
    assert list(summary["sections"]) == list(gpu_plan.DEFAULT_SECTIONS)
    assert summary["sections"]["gpu_tests"]["status"] == "skipped" and summary["plan"][0]["section"] == "gpu_tests"
    assert "== plan: budget 900 s" in proc.stdout and "== done" in proc.stdout
    assert proc.stdout.index("== plan") < proc.stdout.index("== machine")  # the plan comes before anything runs
    assert "== done" in (first / "gpu_evidence.log").read_text()


@pytest.mark.slow  # about 90 s: two sections in processes of their own
def test_a_failed_section_is_recorded_and_the_next_one_runs(tmp_path):
    # A bad override makes resnet18_fast fail; recipes runs after it; a 1 s cap stops the ablation.
    out = tmp_path / "out"
    proc = run_quick(
        out,
        "--budget",
        "600",
        "--sections",
        "resnet18_fast,recipes,ablation",
        "--extra",
        "resnet18_fast=--model.arch=no_such_net",
        "--cap",
        "ablation=1",
    )
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
    for name in SECTIONS:
        (earlier / section_file(name)).write_text(json.dumps({"section": name, "status": "ok", "results": {"x": 1}}))
    out = tmp_path / "out"
    proc = run_quick(out, "--budget", "600", "--sections", "all", "--skip-done", str(earlier))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_evidence.log", "summary.json"]  # nothing ran
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["sections"]) == list(SECTIONS)
    for name in SECTIONS:
        assert summary["sections"][name]["status"] == "skipped"
        assert "already recorded" in summary["sections"][name]["reason"]
    assert proc.stdout.count("already recorded") == len(SECTIONS)  # in the plan, printed first
    # Into the folder of the earlier results itself: they are left as they were.
    proc = run_quick(earlier, "--budget", "600", "--skip-done", str(earlier), "--sections", "airbench")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load(earlier, "airbench") == {"section": "airbench", "status": "ok", "results": {"x": 1}}


def test_a_plan_that_cannot_fit_is_refused_before_anything_runs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    proc = run_quick(out, "--budget", "1")
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.startswith("error: the plan does not fit the budget of 1 s: ") and "--budget 25 " in proc.stderr
    plan = proc.stdout.splitlines()
    assert plan[0] == "== plan: budget 1 s (--quick)" and plan[-1].split()[:2] == ["total", "5"]
    for name in gpu_plan.DEFAULT_SECTIONS:
        assert any(line.split()[0] == name and "does not fit" in line for line in plan), name
    # More sections than the output folder brings back files for; and a GPU run where there is none.
    with pytest.raises(UserError, match="7 sections in one run: the output folder brings back at most 8 files"):
        gpu_evidence.main(
            ["--quick", "--data-dir", "x", "--output-dir", str(out), "--budget", "900", "--sections", "all"]
        )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this machine, also on a GPU one
    with pytest.raises(UserError, match="no CUDA device is visible .* or pass --quick"):
        gpu_evidence.main(["--data-dir", "x", "--output-dir", str(out)])
    assert not out.exists()


def test_the_plan_takes_the_sections_in_order_within_the_budget():
    costs = {"a": gpu_plan.Cost(10, 50, 60), "b": gpu_plan.Cost(20, 20, 40), "c": gpu_plan.Cost(15, 100, 120)}
    plan = gpu_plan.make_plan(["a", "b", "c"], costs, budget=100, prepare=5)
    # a aims at its estimate less what b's and c's minimums need; c takes what is left.
    assert [(r.section, r.seconds, r.ends_at) for r in plan] == [("a", 50, 55), ("b", 20, 75), ("c", 25, 100)]
    assert gpu_plan.refusal(plan, 100, 5) is None
    tight = gpu_plan.make_plan(["a", "b", "c"], costs, budget=60, prepare=5)
    assert [r.seconds for r in tight] == [20, 20, 15]  # every section at or above its minimum
    done = gpu_plan.make_plan(["a", "b", "c"], costs, budget=60, prepare=5, done={"a"})
    assert done[0].reason.startswith("already recorded") and [r.seconds for r in done[1:]] == [20, 35]
    short = gpu_plan.make_plan(["a", "b", "c"], costs, budget=40, prepare=5)
    assert [r.reason is None for r in short] == [True, True, False]
    assert "c would not run" in gpu_plan.refusal(short, 40, 5) and "--budget 50 " in gpu_plan.refusal(short, 40, 5)
    lines = gpu_plan.describe(plan, 100, 5)
    assert lines[1].split()[:3] == ["a", "50", "s"] and lines[-1].split()[:2] == ["total", "100"]
    assert gpu_plan.reserve(["a", "b", "c"], 25, costs) == 25  # what fits of the later minimums, in order


def test_the_default_plan_fits_one_command_of_eight_minutes():
    # The machine's set-up (wheels, data: ~20 s) and a section's stop (10 s) come on top of the budget.
    assert gpu_plan.DEFAULT_BUDGET + 20 + 10 <= 8 * 60
    plan = gpu_plan.make_plan(
        list(gpu_plan.DEFAULT_SECTIONS), gpu_plan.COSTS, gpu_plan.DEFAULT_BUDGET, gpu_plan.PREPARE_SECONDS
    )
    assert gpu_plan.refusal(plan, gpu_plan.DEFAULT_BUDGET, gpu_plan.PREPARE_SECONDS) is None
    assert all(r.reason is None and r.seconds >= r.cost.minimum for r in plan)
    assert [r.section for r in plan] == ["gpu_tests", "airbench", "overhead_data", "compile_sweep"]  # the sweep last
    assert plan[0].seconds == gpu_plan.COSTS["gpu_tests"].estimate  # the tests are never cut short


def test_sections_costs_and_functions_agree():
    assert list(gpu_evidence.section_functions()) == list(SECTIONS) and SECTIONS[-1] == "compile_sweep"
    for cost in gpu_plan.COSTS.values():
        assert 0 < cost.minimum <= cost.estimate <= cost.cap
    capped = gpu_plan.section_costs(False, {"compile_sweep": 100})["compile_sweep"]
    assert capped == gpu_plan.Cost(45, 100, 100)  # --cap bounds the section's own budget too


def test_a_test_run_that_ran_no_test_is_skipped_or_failed_never_ok(tmp_path, monkeypatch):
    # Without CUDA every test of tests/test_gpu.py skips: that is "skipped", with the reasons,
    # where no CUDA was expected (--quick), and a failure where it was.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the test run sees no GPU, also on a machine with one
    ctx = Context("gpu_tests", "unused", tmp_path / "work", tmp_path / "record.json", time.time() + 600)
    ctx.work_dir.mkdir()
    gpu_sections.section_gpu_tests(ctx)
    run = ctx.results["pytest"]
    assert run["passed"] == 0 and run["skipped"] == run["tests"] > 10
    assert ctx.record["outcome"]["status"] == "skipped" and "needs CUDA" in ctx.record["outcome"]["reason"]
    report = (ctx.work_dir / "gpu_tests.xml").read_text()
    expected = Context(
        "gpu_tests", "unused", tmp_path / "work", tmp_path / "record.json", time.time() + 600, expect_cuda=True
    )

    def same_report(cmd, **kwargs):
        (ctx.work_dir / "gpu_tests.xml").write_text(report)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(gpu_sections.subprocess, "run", same_report)
    with pytest.raises(RuntimeError, match="ran no test where CUDA was expected"):
        gpu_sections.section_gpu_tests(expected)
    assert "outcome" not in expected.record


def test_the_compile_sweep_stays_within_its_budget_and_picks_up_where_it_stopped(tmp_path, monkeypatch):
    order = gpu_compile.sweep_order(REPO / "configs")
    assert order[0] == "dainet7" and order.index("fastnet") < order.index("densenet121")  # the recipes' first
    compiled = []

    def fake_fit(ctx, arch, data, backend):
        compiled.append((arch, backend))
        time.sleep(0.5)
        return {"seconds": 0.5, "steps": 1}

    monkeypatch.setattr(gpu_compile, "compiled_fit", fake_fit)
    monkeypatch.setitem(gpu_compile.FIRST_GUESS, "cpu", 0.5)
    ctx = Context("compile_sweep", "unused", tmp_path / "a", tmp_path / "a.json", time.time() + 3, quick=True)
    ctx.work_dir.mkdir()
    gpu_compile.section_compile_sweep(ctx)
    assert 1 <= len(compiled) < len(order) and ctx.results["not_reached"] == order[len(compiled) :]  # its deadline
    assert ctx.left() > -0.5  # no network started that its deadline could not hold
    assert ctx.record["outcome"]["status"] == "incomplete" and {b for _, b in compiled} == {"eager"}
    ctx.save()
    done = len(compiled)
    later = Context(
        "compile_sweep", "unused", tmp_path / "b", tmp_path / "b.json", time.time() + 60, quick=True, earlier=ctx.result
    )
    later.work_dir.mkdir()
    gpu_compile.section_compile_sweep(later)
    assert [a for a, _ in compiled[done:]] == order[done:]  # the rest, each network once
    assert later.results["not_reached"] == [] and "outcome" not in later.record
    assert all(later.results["networks"][a]["earlier_run"] for a in order[:done])

    def failing_fit(ctx, arch, data, backend):
        if arch == "fastnet":
            raise RuntimeError("no graph")
        return {"seconds": 0.0, "steps": 1}

    monkeypatch.setattr(gpu_compile, "compiled_fit", failing_fit)
    failed = Context("compile_sweep", "unused", tmp_path / "c", tmp_path / "c.json", time.time() + 60, quick=True)
    failed.work_dir.mkdir()
    with pytest.raises(RuntimeError, match="1 network.* failed compiled with eager: fastnet"):
        gpu_compile.section_compile_sweep(failed)
    assert failed.results["networks"]["fastnet"]["error"] == "RuntimeError: no graph"
    assert len(failed.results["networks"]) == len(order)  # the others still ran


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

    fake = types.SimpleNamespace(
        train94=train94, CifarLoader=lambda *a, **k: None, evaluate=lambda net, loader, tta_level: 0.94012
    )
    monkeypatch.setitem(sys.modules, "airbench", fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    ctx = Context("airbench", str(tiny_folder), tmp_path / "work", tmp_path / "record.json", time.time() + 60)
    data = gpu_sections.airbench_data(ctx)
    train = torch.load(Path(data["folder"]) / "cifar10" / "train.pt")
    assert train["images"].dtype == torch.uint8 and tuple(train["images"].shape[1:]) == (32, 32, 3)
    assert train["labels"].dtype == torch.int64
    assert train["classes"] == sorted(p.name for p in (tiny_folder / "train").iterdir())  # CIFAR-10's order
    # The CPU harness's writer, in its one shuffled order: not the folder's class by class.
    assert data["train_order"].startswith("shuffled") and not torch.equal(
        train["labels"], train["labels"].sort().values
    )
    result = gpu_sections.airbench_run(ctx, "train94", 1)
    assert seen == {"files": ["test.pt", "train.pt"], "run": 1}
    assert result["train_seconds"] == 2.9 and result["epochs"] == 2  # its own count, before the TTA evaluation
    assert result["seconds_with_tta"] == 3.3 and result["tta_acc"] == 0.94012


def test_comparisons_and_headlines():
    runs = {
        "base": [{"tta_acc": 0.9, "train_seconds": 2.0, "wall_seconds": 3.0}],
        "ours": [
            {"tta_acc": 0.91, "train_seconds": 3.0, "wall_seconds": 5.0},
            {"tta_acc": 0.93, "train_seconds": 5.0, "wall_seconds": 7.0},
        ],
    }
    results = {"runs": runs, "baseline": "base"}
    lines = gpu_evidence.headline(results)
    ours = results["summary"]["ours"]
    assert ours["tta_acc"]["n"] == 2 and ours["time_ratio_to_baseline"] == 2.0
    assert ours["acc_diff_points_vs_baseline"] == pytest.approx(2.0)
    assert any(line.startswith("ours: 92.00 +- 1.41% (TTA), 2 seed(s)") and "x2.00 base's" in line for line in lines)
