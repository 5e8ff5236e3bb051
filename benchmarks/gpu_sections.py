"""The sections of ``scripts/gpu_evidence.py``: what runs inside each section's own process.

A section records every run as soon as it ends (``Context.save``), so one stopped by its time cap
still leaves what it measured, and plans its optional runs (more seeds, the compile check) against
``Context.deadline``. Fits of ours go through the CLI in this process, after a warm-up, as
airbench's ``warmup94()`` does for its side; each writes into a temporary folder that is deleted.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import REPO
from benchmarks.gpu_airbench import (  # noqa: F401 (part of this module's interface)
    _free_memory,
    airbench_data,
    airbench_run,
    airbench_unavailable,
    parse_airbench_table,
)
from benchmarks.gpu_timing import _sync, fast_path, mixed_precision, train_clock  # noqa: F401 (its interface)

#: ``--quick``: two steps of tiny batches, one batch of each evaluation, on the CPU.
QUICK_FIT = [
    "--trainer.max_epochs=1",
    "--trainer.max_steps=2",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--data.batch_size=4",
]

#: The recipes set beside airbench94, trained on all 50,000 images as airbench trains. fastnet
#: keeps its own 484 steps of 1,024 (11 epochs of 45k; 9.9 epochs of 50k like airbench94's 476
#: steps) instead of 11 epochs of 50k; fastnet_muon's 8 epochs of 50k are airbench94_muon's 200 steps.
AIRBENCH94_PAIRS: dict[str, tuple[str, list[str]]] = {
    "fastnet": ("fastnet.yaml", ["--trainer.max_steps=484"]),
    "fastnet_muon": ("fastnet_muon.yaml", []),
}

#: Seeds of a side-by-side comparison: at least MIN, at most MAX, as many as the deadline allows.
MIN_SEEDS, MAX_SEEDS = 2, 5

#: Planning estimates on one H100, seconds (derived in ``gpu_evidence.COSTS``): a round of seeds of
#: the airbench section, our two warm-up fits there, and the compile check.
PLAN = {"round": 18.0, "warmups": 10.0, "compile_check": 45.0}


# ---------------------------------------------------------------------------------------------
# The section's context: where it writes, how long it has, what it has recorded
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    """One section's process: its data, scratch folder, result file, deadline and record."""

    section: str
    data_dir: str
    work_dir: Path
    result: Path
    deadline: float
    quick: bool = False
    extra: list[str] = field(default_factory=list)
    configs: Path = Path("configs")  # the recipes folder
    record: dict[str, Any] = field(default_factory=lambda: {"commands": [], "results": {}})
    expect_cuda: bool = False  # the command runs on a GPU: a test that skips for want of CUDA fails
    earlier: Path | None = None  # this section's record from an earlier run (--skip-done)

    def __post_init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.results: dict[str, Any] = self.record["results"]

    def left(self) -> float:
        """Seconds until the section's deadline."""
        return self.deadline - time.time()

    def command(self, text: str) -> None:
        self.record["commands"].append(text)
        print(f"+ {text}", flush=True)

    def outcome(self, status: str, reason: str) -> None:
        """The section ended well but did less than its whole plan: ``skipped`` (it ran nothing) or
        ``incomplete`` (its time ended first); the runner records this status and reason."""
        self.record["outcome"] = {"status": status, "reason": reason}

    def save(self) -> None:
        tmp = self.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.result)

    def fit_args(self, overrides: list[str]) -> list[str]:
        """The fast path (on a GPU, and on the CPU with --quick), then ``overrides``, then tiny runs
        with --quick, then ``--extra``."""
        fast = fast_path() if self.cuda or self.quick else ["--data.loader=tensor"]
        return [*fast, *overrides, *(QUICK_FIT if self.quick else []), *self.extra]


def guarded(ctx: Context, key: str, fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, or None with the error kept under ``results[key]``: one system failing
    (airbench, compilation) must not lose the other's runs."""
    try:
        return fn(*args)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        ctx.results[key] = {"status": "failed", "error": error, "traceback": traceback.format_exc()[-3000:]}
        print(f"{key} failed: {error}", flush=True)
        return None


def timed_fit(ctx: Context, config: Path, seed: int, overrides: list[str]) -> dict[str, Any]:
    """One seed of ``config`` on all training images, tested with its TTA. No checkpoint: without a
    validation split the last epoch is the result."""
    from benchmarks.fitting import build_fit, prepare, quiet_args

    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=ctx.work_dir) as out:
        accelerator = "gpu" if ctx.cuda else "cpu"
        args = [*quiet_args(ctx.data_dir, out, seed, accelerator), "--data.val_size=0", *ctx.fit_args(overrides)]
        ctx.command(
            f"python -m cifar_lightning fit --config={config} {shlex.join(args)}  # in-process, training steps timed"
        )
        clock = train_clock(ctx.device)
        cli = build_fit(config, args, callbacks=[clock])
        trainer, model, dm = cli.trainer, cli.model, cli.datamodule
        prepare(cli)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        fit_seconds = time.perf_counter() - start
        (metrics,) = trainer.test(model, datamodule=dm, verbose=False)
        seconds = clock.seconds()
        result = {
            "seed": seed,
            "tta_acc": round(float(metrics["test/acc"]), 5),
            "tta": model.hparams.tta,
            "train_seconds": None if seconds is None else round(seconds, 3),
            "whiten_seconds": round(clock.whiten_seconds, 4),
            "precision": str(trainer.precision),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "fit_seconds": round(fit_seconds, 2),
            "wall_seconds": round(time.perf_counter() - wall, 2),
            "train_images": len(dm.train_set),
            "test_images": len(dm.test_set),
            "compile": bool(model.hparams.compile),
        }
    del cli, trainer, model, dm
    _free_memory()
    print(f"{config.stem} seed {seed}: " + json.dumps(result), flush=True)
    return result


def fit_recipe(ctx: Context, config: Path, overrides: list[str]) -> dict[str, Any]:
    """Seed 0 of a recipe as written, through ``scripts/fit.py`` (validation split, best epoch, test)."""
    from cifar_lightning.fit import fit_main

    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=ctx.work_dir) as out:
        argv = [
            "--config",
            str(config),
            "--data-dir",
            ctx.data_dir,
            "--no-download",
            "--seed",
            "0",
            "--output-dir",
            out,
            "--accelerator",
            "gpu" if ctx.cuda else "cpu",
            "--devices",
            "1",
            *ctx.fit_args(overrides),
        ]
        ctx.command(shlex.join(["python", "scripts/fit.py", *argv]))
        report = fit_main(argv)
    _free_memory()
    keep = (
        "test_acc",
        "test_loss",
        "fit_seconds",
        "test_seconds",
        "epochs",
        "global_step",
        "train_images",
        "val_images",
        "test_images",
        "seed",
    )
    return {k: report.get(k) for k in keep} | {"wall_seconds": round(time.perf_counter() - wall, 2)}


def compile_check(ctx: Context, config: Path, batch: int, planned_images: int, compiles: int) -> dict[str, Any]:
    """Does ``--model.compile true`` pay? Bare training steps of the recipe's network (bf16 autocast,
    NHWC, Nesterov SGD), eager and compiled, and what the first compiled step costs.

    It pays when a compiled step is at least 5% faster and the seconds saved over ``planned_images``
    exceed ``compiles`` first compilations (one per recipe). On a CPU it runs with the ``eager``
    backend, to be short, and never pays.
    """
    import torch.nn.functional as F
    import yaml

    from cifar_lightning.models import create_model

    spec = yaml.safe_load(config.read_text())["model"]
    device, steps = ctx.device, (2 if ctx.quick else 20)
    half = torch.bfloat16 if mixed_precision() == "bf16-mixed" else torch.float16
    torch.manual_seed(0)
    net = create_model(spec["arch"], num_classes=10, **(spec.get("arch_kwargs") or {}))
    net = net.to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

    def step(f: Callable) -> None:
        with torch.autocast(device.type, dtype=half, enabled=ctx.cuda):
            loss = F.cross_entropy(f(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def seconds_per_step(f: Callable) -> float:
        for _ in range(3):
            step(f)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(f)
        _sync(device)
        return (time.perf_counter() - start) / steps

    backend = "inductor" if ctx.cuda else "eager"
    eager = seconds_per_step(net)
    compiled = torch.compile(net, backend=backend)
    start = time.perf_counter()
    step(compiled)
    _sync(device)
    first = time.perf_counter() - start
    fast = seconds_per_step(compiled)
    saved = (eager - fast) / batch * planned_images
    pays = ctx.cuda and fast < 0.95 * eager and saved > compiles * first
    return {
        "network": spec["arch"],
        "batch_size": batch,
        "backend": backend,
        "timed_steps": steps,
        "eager_step_seconds": round(eager, 5),
        "compiled_step_seconds": round(fast, 5),
        "first_compiled_step_seconds": round(first, 2),
        "planned_images": planned_images,
        "seconds_saved_over_plan": round(saved, 2),
        "compilations": compiles,
        "pays": bool(pays),
        "rule": "a compiled step >= 5% faster, and seconds saved > compilations x first compiled step",
    }


# ---------------------------------------------------------------------------------------------
# The sections, in the runner's order of priority
# ---------------------------------------------------------------------------------------------


def section_gpu_tests(ctx: Context) -> None:
    """``pytest -m gpu``: the CUDA paths tested before anything is measured on them. Counts,
    each failure with its message, and the reasons of the skips. A run in which no test ran is not
    ok: ``skipped``, with the reasons, where no CUDA was expected (``--quick``), else failed."""
    import xml.etree.ElementTree as ET

    report = ctx.work_dir / "gpu_tests.xml"
    # tests/test_gpu.py holds the gpu tests; collecting only it keeps a module that imports a
    # package the GPU machine lacks (wandb) from failing the run.
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        "tests/test_gpu.py",
    ]
    ctx.command(shlex.join(["python", *cmd[1:-2], "--junitxml=<work>/gpu_tests.xml", "tests/test_gpu.py"]))
    start = time.perf_counter()
    # No limit of its own: a test run stopped half-way leaves no report; the section's cap stops it.
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    res: dict[str, Any] = {"exit_code": code, "seconds": round(time.perf_counter() - start, 1), "output_tail": tail}
    if report.is_file():
        suite = ET.parse(report).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        cases = list(suite.iter("testcase"))
        failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
        skipped = [c for c in cases if c.find("skipped") is not None]
        res.update(
            tests=len(cases),
            failed=len(failed),
            skipped=len(skipped),
            passed=len(cases) - len(failed) - len(skipped),
            failures=[
                {
                    "test": f"{c.get('classname')}::{c.get('name')}",
                    "message": (
                        (c.find("failure") if c.find("failure") is not None else c.find("error")).get("message") or ""
                    )[:500],
                }
                for c in failed
            ],
            skip_reasons=sorted({(c.find("skipped").get("message") or "")[:200] for c in skipped}),
        )
    ctx.results["pytest"] = res
    ctx.save()
    if res.get("failed", 1) or res.get("tests") is None:
        # The section fails, its results kept, so that --skip-done runs the tests again.
        raise RuntimeError(f"pytest -m gpu: {res.get('failed', 'no report')} failed (exit code {code})")
    if res["passed"] == 0:
        why = f"{res['skipped']} skipped: " + ("; ".join(res["skip_reasons"]) or "no test collected")
        if ctx.expect_cuda:
            raise RuntimeError(f"pytest -m gpu ran no test where CUDA was expected ({why})")
        ctx.outcome("skipped", f"pytest -m gpu ran no test ({why})")


def section_airbench(ctx: Context) -> None:
    """airbench94 beside fastnet and fastnet_muon through our CLI, seeds alternating."""
    res = ctx.results
    res["airbench_data"] = airbench_data(ctx)
    ctx.save()
    skip = airbench_unavailable()
    if skip:
        res["airbench94"] = {"status": "skipped", "reason": skip}
    else:
        res["airbench94_warmup"] = guarded(ctx, "airbench94", airbench_run, ctx, "warmup94", -1)
    round_images = 484 * 1024 + 200 * 2000  # fastnet's steps of 1,024 and fastnet_muon's of 2,000
    spare = ctx.left() - PLAN["warmups"] - MIN_SEEDS * PLAN["round"]
    if ctx.cuda and not ctx.quick and spare < PLAN["compile_check"]:
        need = PLAN["compile_check"]
        res["compile"] = {"pays": False, "skipped": f"{spare:.0f} s to spare, the check takes ~{need:.0f} s"}
    else:
        batch = 16 if ctx.quick else 1024
        checked = guarded(
            ctx,
            "compile",
            compile_check,
            ctx,
            ctx.configs / "fastnet.yaml",
            batch,
            MAX_SEEDS * round_images,
            len(AIRBENCH94_PAIRS),
        )
        res["compile"] = checked or res["compile"]
    compile_on = res["compile"].setdefault("pays", False)
    compiled = [f"--model.compile={str(compile_on).lower()}"]
    if ctx.quick and not ctx.cuda:
        # The compiled path through a Trainer, as a GPU takes it when compiling pays; dynamo's
        # graphs without the CPU's code generation, which would take minutes.
        compile_on, compiled = True, ["--model.compile=true", "--model.compile_backend=eager"]
    overrides = {name: [*o, *compiled] for name, (_, o) in AIRBENCH94_PAIRS.items()}
    ctx.save()
    if ctx.cuda or ctx.quick:  # cuDNN autotuning, compilation (before and after FreezeAfter) off the clock
        warmup = ["--trainer.max_steps=-1", f"--trainer.max_epochs={4 if compile_on else 1}"]
        res["warmup"] = {
            name: timed_fit(ctx, ctx.configs / config, 0, overrides[name] + warmup)
            for name, (config, _) in AIRBENCH94_PAIRS.items()
        }
    ok = not skip and "airbench94" not in res  # not skipped, its warm-up did not fail
    runs: dict[str, list] = ({"airbench94": []} if ok else {}) | {name: [] for name in AIRBENCH94_PAIRS}
    res["runs"], res["baseline"], round_seconds = runs, "airbench94", 0.0
    for seed in range(MIN_SEEDS if ctx.quick else MAX_SEEDS):
        if seed >= MIN_SEEDS and ctx.left() < 1.1 * round_seconds:
            res["stopped"] = f"after {seed} seeds: {ctx.left():.0f} s left, the last round took {round_seconds:.0f} s"
            break
        start = time.perf_counter()
        if ok:
            ok = (run := guarded(ctx, "airbench94", airbench_run, ctx, "train94", seed)) is not None
            runs["airbench94"] += [run] if ok else []
            ctx.save()
        for name, (config, _) in AIRBENCH94_PAIRS.items():
            runs[name].append(timed_fit(ctx, ctx.configs / config, seed, overrides[name]))
            ctx.save()
        round_seconds = time.perf_counter() - start


def section_overhead_data(ctx: Context) -> None:
    """The bench ``overhead`` section (fastnet, batch 1024) and the ``data`` section, plus the
    per-image loaders with every core as a DataLoader worker (``bench_data`` uses 2)."""
    from benchmarks.bench_overhead import bench_overhead
    from benchmarks.bench_speed import BenchConfig, bench_data

    if ctx.quick:
        cfg = BenchConfig.quick_config(data_dir=ctx.data_dir)
    else:
        # 3 alternating blocks of 50 steps per variant: short enough for the section's cap.
        cfg = BenchConfig(
            data_dir=ctx.data_dir,
            accelerator="gpu" if ctx.cuda else "cpu",
            overhead_arch="fastnet",
            overhead_batch_size=1024,
            timed_steps=50,
            repeats=3,
        )
    ctx.command(
        f"python scripts/bench.py --sections overhead,data --data-dir {ctx.data_dir} "
        f"--accelerator {cfg.accelerator} --overhead-arch {cfg.overhead_arch} "
        f"--overhead-batch-size {cfg.overhead_batch_size} --timed-steps 50 --repeats 3"
    )
    res = ctx.results
    res["overhead"] = bench_overhead(cfg)
    ctx.save()
    res["data"] = bench_data(cfg)
    ctx.save()
    workers = min(2, os.cpu_count() or 1) if ctx.quick else os.cpu_count() or 1
    from benchmarks.bench_speed import per_image_loaders

    res["data_all_cores"] = per_image_loaders(cfg, workers, res["data"]["tensor_loader"]["images_per_s"])


def section_resnet18_fast(ctx: Context) -> None:
    """configs/resnet18_fast.yaml beside airbench95 on the same images: accuracy and seconds."""
    config, res = ctx.configs / "resnet18_fast.yaml", ctx.results
    skip = airbench_unavailable()
    if skip:
        res["airbench95"] = {"status": "skipped", "reason": skip}
    else:
        res["airbench_data"] = airbench_data(ctx)
        res["airbench95_warmup"] = guarded(ctx, "airbench95", airbench_run, ctx, "warmup95", -1)
    if ctx.cuda:  # (--quick: the airbench section already runs warm-up fits)
        warmup = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=10", "--trainer.limit_test_batches=2"]
        res["warmup"] = timed_fit(ctx, config, 0, warmup)
    runs: dict[str, list] = ({} if skip or "airbench95" in res else {"airbench95": []}) | {"resnet18_fast": []}
    res["runs"], res["baseline"], last, systems = runs, "airbench95", dict.fromkeys(runs, 0.0), list(runs)
    for seed in range(1 if ctx.quick else MAX_SEEDS):
        ran = False
        for name in [n for n in systems if seed == 0 or ctx.left() >= 1.1 * last[n]]:
            start, ran = time.perf_counter(), True
            if name == "resnet18_fast":
                runs[name].append(timed_fit(ctx, config, seed, []))
            elif (run := guarded(ctx, name, airbench_run, ctx, "train95", seed)) is not None:
                runs[name].append(run)
            else:
                systems.remove(name)
            last[name] = time.perf_counter() - start
            ctx.save()
        if not ran:
            break


#: Planning estimate on one H100, seconds: resnet20_paper's 64k steps (see gpu_evidence.COSTS).
RESNET20_PAPER_SECONDS = 420.0


def section_recipes(ctx: Context) -> None:
    """Recipes as written, through ``scripts/fit.py``: configs/resnet34_tutorial.yaml (20 epochs)
    and configs/mynet_tutorial.yaml, then one seed of configs/resnet20_paper.yaml's 64k
    iterations where the deadline leaves time for it."""
    quick = ["--data.val_size=16"] if ctx.quick else []
    for name in ("resnet34_tutorial", "mynet_tutorial", "resnet20_paper"):
        if name == "resnet20_paper" and not ctx.quick and ctx.left() < RESNET20_PAPER_SECONDS:
            ctx.results[name] = {
                "status": "skipped",
                "reason": f"{ctx.left():.0f} s left, it needs about {RESNET20_PAPER_SECONDS:.0f} s",
            }
            continue
        ctx.results[name] = fit_recipe(ctx, ctx.configs / f"{name}.yaml", quick)
        ctx.save()


#: The sections by name, in the runner's order of priority.
SECTION_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "gpu_tests": section_gpu_tests,
    "airbench": section_airbench,
    "overhead_data": section_overhead_data,
    "resnet18_fast": section_resnet18_fast,
    "recipes": section_recipes,
}
