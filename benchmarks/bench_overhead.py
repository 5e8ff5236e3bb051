"""The overhead benchmark: Lightning's Trainer.fit against a bare PyTorch loop, step by step."""

from __future__ import annotations

import cProfile
import pstats
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_speed import TARGETS, BenchConfig, _datamodule, _device, _sync
from benchmarks.fitting import build_fit


def seeded_network(arch: str, dm, device: torch.device | None = None):
    """The network every overhead side trains, built from seed 0 (initialised from the data where
    it needs it), and the module defaults' hyperparameters, for the same optimizer and schedule."""
    from cifar_lightning.module import ClassifierModule

    torch.manual_seed(0)
    module = ClassifierModule(arch=arch, num_classes=dm.num_classes, class_names=dm.class_names, lr=OVERHEAD_LR)
    if device is not None:
        module.to(device)
    module.init_network_from(dm)
    return module.model, module.hparams


class BareLoop:
    """The same network, data path, loss, optimizer and per-step schedule as a fit, no framework.

    ``step()`` runs one whole training step, fetching its batch included. The network is built
    with the same seed as the fit's, from the same registry.
    """

    def __init__(self, cfg: BenchConfig, arch: str, bs: int, device: torch.device, steps: int) -> None:
        from types import SimpleNamespace

        from cifar_lightning.optim import build_optimizer, build_scheduler

        dm = _datamodule(cfg, loader="tensor", augment="standard", batch_size=bs)
        self.batches = iter(dm.tensor_loader(dm.train_set, train=True, device=device, seed=1))
        self.model, settings = seeded_network(arch, dm, device)
        self.model.train()
        self.opt = build_optimizer(self.model, settings)
        schedule_length = SimpleNamespace(
            estimated_stepping_batches=steps, num_training_batches=steps, accumulate_grad_batches=1, max_epochs=1
        )
        configured = build_scheduler(self.opt, settings, schedule_length)
        self.sched = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None

    def step(self) -> None:
        import torch.nn.functional as F

        x, y = next(self.batches)
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()


class _Interleaved:
    """A Lightning callback that runs one bare-loop step inside each of the fit's steps, so the two
    sides alternate step by step and every drift of the machine's speed (seconds long on a shared
    VM) reaches both alike.

    At each ``on_train_batch_start`` it times one ``bare.step()``; the fit's step is the time from
    leaving this hook to entering it again one batch later: the rest of the hooks, the training
    step, the optimizer, logging, the progress bar and fetching the next batch. It is the last
    callback but Lightning's checkpointing, which does nothing during these steps.
    """

    def __new__(cls, bare: "BareLoop", warmup: int, steps: int, device: torch.device, out: dict[str, list[float]]):
        from lightning.pytorch.callbacks import Callback

        class _Timer(Callback):
            left_at: float | None = None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                _sync(device)
                now = time.perf_counter()
                if self.left_at is not None and batch_idx > warmup:
                    out["fit"].append(now - self.left_at)
                if batch_idx < warmup + steps:
                    bare.step()
                    _sync(device)
                    if batch_idx >= warmup:
                        out["bare"].append(time.perf_counter() - now)
                self.left_at = time.perf_counter()

        return _Timer()


#: A learning rate small enough for the overhead networks to stay finite, so both sides time
#: ordinary arithmetic rather than NaNs.
OVERHEAD_LR = 0.01

#: Overhead variants: what each Trainer carries beyond the bare loop.
OVERHEAD_VARIANTS = {
    "terminal": "the defaults as on a terminal: the rich progress bar drawn (to a null console) instead of the "
    "log-file lines",
    "defaults": "the CLI's defaults: progress bar, model summary, LR monitor, checkpointing, CSV logger, metrics",
    "no_progress_bar": "the defaults without progress bar and model summary",
    "bare_trainer": "no logger, no callbacks (the module's own metrics and logging calls stay)",
    "lightning_floor": "Lightning's own loop: a Trainer with no logger and no callbacks fitting a minimal, stock "
    "LightningModule (the network, cross-entropy, the same optimizer and schedule; no metrics, no logging)",
}


@contextmanager
def _flush_denormal():
    """Subnormal floats on the CPU make a backward pass up to 20x slower. A loss that has fallen
    near zero (a small, easy dataset) fills the gradients with them, at a different step on each
    side, so the overhead runs flush them to zero and both sides time ordinary arithmetic."""
    before = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if before:  # set_flush_denormal returns whether the CPU supports it
            torch.set_flush_denormal(False)


def _overhead_args(cfg: BenchConfig, arch: str, bs: int, steps: int, out: Path, variant: str) -> list[str]:
    args = [
        f"--data.data_dir={cfg.data_dir}",
        "--data.download=false",
        "--data.loader=tensor",
        f"--data.val_size={cfg.val_size}",
        f"--data.batch_size={bs}",
        f"--model.arch={arch}",
        f"--model.lr={OVERHEAD_LR}",
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={steps}",
        "--trainer.limit_val_batches=0",
        f"--trainer.accelerator={cfg.accelerator}",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
    ]
    if variant in ("no_progress_bar", "bare_trainer"):
        args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if variant == "bare_trainer":
        args += ["--trainer.logger=false"]
    return args


def _interleaved_fit(
    cfg: BenchConfig, arch: str, bs: int, device: torch.device, variant: str, extra_callbacks: tuple = ()
) -> dict[str, list[float]]:
    """Seconds of each of ``cfg.timed_steps`` steps of one Trainer.fit of ``variant``, and of the bare
    step run beside each, after ``cfg.warmup_steps`` of both. ``extra_callbacks`` join the fit's."""
    # One batch more than timed: the last timed step ends where the next one starts.
    steps = cfg.warmup_steps + cfg.timed_steps + 1
    bare = BareLoop(cfg, arch, bs, device, steps)
    timing: dict[str, list[float]] = {"fit": [], "bare": []}
    with tempfile.TemporaryDirectory() as out, _flush_denormal():
        # The defaults are a user's fit: its checkpoint callbacks too. A bare trainer drops the
        # CLI's own callbacks (LR monitor, ...) as well.
        interleaved = _Interleaved(bare, cfg.warmup_steps, cfg.timed_steps, device, timing)
        if variant == "lightning_floor":
            _floor_fit(cfg, arch, bs, steps, Path(out), [*extra_callbacks, interleaved])
            return _enough(timing, cfg, steps, bs)
        with _progress_as_on_a_terminal(variant == "terminal"):
            cli = build_fit(
                overrides=_overhead_args(cfg, arch, bs, steps, Path(out), variant),
                checkpoints=True,
                cli_callbacks=variant != "bare_trainer",
                callbacks=[*extra_callbacks, interleaved],
            )
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return _enough(timing, cfg, steps, bs)


@contextmanager
def _progress_as_on_a_terminal(enabled: bool):
    """The default callbacks' progress display as a terminal gets it (the rich bar), drawn into a
    console that writes nowhere, so its redraws cost what they cost a user at a terminal."""
    if not enabled:
        yield
        return
    import io
    from unittest import mock

    from cifar_lightning.callbacks import QuietRichProgressBar

    console = {"file": io.StringIO(), "force_terminal": True, "width": 120}
    with mock.patch(
        "cifar_lightning.callbacks.progress_callback", lambda stream=None: QuietRichProgressBar(console_kwargs=console)
    ):
        yield


def _enough(timing: dict[str, list[float]], cfg: BenchConfig, steps: int, bs: int) -> dict[str, list[float]]:
    if len(timing["fit"]) < cfg.timed_steps:
        raise RuntimeError(f"the training set has fewer than {steps} batches of {bs}")
    return timing


def _floor_fit(cfg: BenchConfig, arch: str, bs: int, steps: int, out: Path, callbacks: list) -> None:
    """``steps`` steps of a Trainer fitting a stock LightningModule that holds nothing of this
    package but the network and its optimizer: what Lightning's loop costs a module that does
    nothing but the step (it keeps nn.Module's own __setattr__, which ClassifierModule bypasses
    for the hook names)."""
    import lightning.pytorch as pl
    import torch.nn.functional as F

    from cifar_lightning.optim import build_optimizer, build_scheduler

    class _Minimal(pl.LightningModule):
        def __init__(self, dm) -> None:
            super().__init__()
            self.model, self.settings = seeded_network(arch, dm)  # the bare loop's network

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return build_scheduler(build_optimizer(self.model, self.settings), self.settings, self.trainer)

    dm = _datamodule(cfg, loader="tensor", augment="standard", batch_size=bs)
    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=callbacks,
    )
    trainer.fit(_Minimal(dm), datamodule=dm)


def _interleaved_null(cfg: BenchConfig, arch: str, bs: int, device: torch.device) -> dict[str, list[float]]:
    """The method's null reading: two identical bare loops, stepped in turn as a fit and its bare
    loop are. Their difference should be zero; what it reads is the method's own error."""
    steps = cfg.warmup_steps + cfg.timed_steps
    first, second = BareLoop(cfg, arch, bs, device, steps), BareLoop(cfg, arch, bs, device, steps)
    timing: dict[str, list[float]] = {"fit": [], "bare": []}
    with _flush_denormal():
        _step_in_turn(first, second, steps, cfg.warmup_steps, device, timing)
    return timing


def _step_in_turn(first: "BareLoop", second: "BareLoop", steps: int, warmup: int, device: torch.device, timing) -> None:
    for i in range(steps):
        times = []
        for loop in (first, second):
            _sync(device)
            start = time.perf_counter()
            loop.step()
            _sync(device)
            times.append(time.perf_counter() - start)
        if i >= warmup:
            timing["bare"].append(times[0])
            timing["fit"].append(times[1])


#: Where a profiled function's time is counted: the first group whose path part its file's path
#: holds (``/`` separators). This package first: its name contains "lightning".
PROFILE_GROUPS = (
    ("/cifar_lightning/", "this package (module, callbacks, data)"),
    ("/lightning/pytorch/callbacks/", "Lightning's callbacks (progress bar, checkpointing, LR monitor)"),
    ("/lightning/pytorch/loggers/", "Lightning's loggers"),
    ("/logger_connector/", "Lightning's logging of metrics"),
    ("/lightning/", "Lightning's loop, hooks and strategy"),
    ("/torchmetrics/", "torchmetrics (the module's metric updates)"),
    ("/torch/", "torch's Python (modules, optimizer, autograd)"),
)


def profile_fit(cfg: BenchConfig, arch: str, bs: int, variant: str = "defaults", steps: int = 200) -> dict[str, Any]:
    """cProfile of ``steps`` steps of one Trainer.fit of ``variant``, per step and by where the code
    lives (``PROFILE_GROUPS``). The profiler inflates Python time several-fold, so the shares, not
    the milliseconds, say where the framework's time goes."""
    from lightning.pytorch.callbacks import Callback

    profiler = cProfile.Profile()
    warmup = cfg.warmup_steps

    class _Profile(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                profiler.enable()
            elif batch_idx == warmup + steps:
                profiler.disable()

    with tempfile.TemporaryDirectory() as out, _flush_denormal():
        cli = build_fit(
            overrides=_overhead_args(cfg, arch, bs, warmup + steps + 1, Path(out), variant),
            checkpoints=True,
            callbacks=[_Profile()],
        )
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for (path, _, name), (_, calls, own, _, _) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        if path == "~":  # built-ins: the tensor arithmetic itself is here
            group = "C++ (tensor operations and other built-ins)"
        else:
            path = path.replace("\\", "/")
            group = next(
                (label for key, label in PROFILE_GROUPS if key in path), "other Python (standard library, ...)"
            )
        groups[group][0] += calls
        groups[group][1] += own
    total = sum(own for _, own in groups.values())
    return {
        "variant": variant,
        "steps": steps,
        "note": "cProfile's own time by file; it inflates Python time, so read the shares",
        "groups": {
            g: {
                "calls_per_step": round(c / steps, 1),
                "profiled_ms_per_step": round(1e3 * t / steps, 3),
                "share": round(t / total, 4),
            }
            for g, (c, t) in sorted(groups.items(), key=lambda kv: -kv[1][1])
        },
    }


def _pair_stats(fit: list[float], bare: list[float]) -> dict[str, float]:
    """Mean, standard error and median of fit - bare in ms, and the ratio of their totals."""
    diff = 1e3 * (np.asarray(fit) - np.asarray(bare))
    return {
        "mean_ms": float(diff.mean()),
        "se_ms": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan"),
        "median_ms": float(np.median(diff)),
        "ratio": float(np.sum(bare) / np.sum(fit)),
    }


def bench_overhead(cfg: BenchConfig) -> dict[str, Any]:
    """Framework time per step: Trainer.fit of each variant against a bare loop, step by step.

    Inside each fit a callback runs one bare-loop step (its own network, optimizer and data) at
    every training step (``_Interleaved``), so each fit step has a bare step beside it, timed
    within milliseconds of it. Per variant, over every timed pair of every repeat: the mean of
    (fit step - bare step), the framework's milliseconds per step with its standard error (of
    the fits' means, which differ by more than their steps suggest; the mean, not the median, so
    that work done every n steps, such as logging, counts), the
    median, and the ratio of total bare time to total fit time. Repeats run the variants in
    turn, in reverse order on odd repeats. ``ordered`` says whether fewer callbacks read as no
    more overhead, within two standard errors: if not, the figures are noise. ``null_ms_per_step``
    is the same reading between two identical bare loops (``_interleaved_null``): the method's own
    error, which should be zero within its standard error. ``lightning_floor`` fits a minimal
    LightningModule with nothing of this package but the network (``_floor_fit``): Lightning's own
    cost, and ``ours_ms_per_step`` what the package adds above it. ``profile`` says where the time of a
    default fit's step goes (``profile_fit``). On steps of 10-50
    ms (a small network and batch on a CPU) a millisecond of framework shows; on steps of
    seconds it cannot (``bare_step_ms`` says which).
    """
    device = _device(cfg.accelerator)
    gpu = device.type == "cuda"
    arch = cfg.overhead_arch or ("fastnet" if gpu else "simple_cnn")
    bs = cfg.overhead_batch_size or (1024 if gpu else 32)
    pairs: dict[str, dict[str, list[float]]] = {v: {"fit": [], "bare": []} for v in OVERHEAD_VARIANTS}
    for r in range(cfg.repeats):
        for v in list(OVERHEAD_VARIANTS) if r % 2 == 0 else list(OVERHEAD_VARIANTS)[::-1]:
            for side, ts in _interleaved_fit(cfg, arch, bs, device, v).items():
                pairs[v][side] += ts
    stats = {v: _pair_stats(p["fit"], p["bare"]) for v, p in pairs.items()}
    # Each fit has its own memory layout and start: its steps are not independent of each other,
    # so the standard error is that of the fits' means (over repeats), when there are several.
    n = cfg.timed_steps
    for v, p in pairs.items():
        fits = [
            1e3 * (np.mean(p["fit"][i : i + n]) - np.mean(p["bare"][i : i + n])) for i in range(0, len(p["fit"]), n)
        ]
        stats[v]["fit_means_ms"] = [round(float(f), 3) for f in fits]
        if len(fits) > 1:
            stats[v]["se_ms"] = max(stats[v]["se_ms"], float(np.std(fits, ddof=1) / np.sqrt(len(fits))))
    null = _interleaved_null(cfg, arch, bs, device)
    null_stats = _pair_stats(null["fit"], null["bare"])
    ms = {v: s["mean_ms"] for v, s in stats.items()}
    # Each variant carries less than the one before it: its overhead must not read as more.
    names = list(OVERHEAD_VARIANTS)
    ordered = all(ms[b] <= ms[a] + 2 * (stats[a]["se_ms"] + stats[b]["se_ms"]) for a, b in zip(names, names[1:]))
    bare_step = float(np.mean([t for p in pairs.values() for t in p["bare"]]))
    target = TARGETS["overhead_gpu" if gpu else "overhead_cpu"]
    return {
        "arch": arch,
        "batch_size": bs,
        "device": str(device),
        "method": "one bare-loop step inside each Trainer.fit step; mean over all pairs of (fit step - bare step)",
        "met": bool(
            stats["defaults"]["ratio"] >= target["ratio"]
            and (target.get("framework_ms") is None or ms["defaults"] <= target["framework_ms"])
        ),
        "ordered": bool(ordered),
        "variants": OVERHEAD_VARIANTS,
        "timed_steps": cfg.timed_steps,
        "warmup_steps": cfg.warmup_steps,
        "repeats": cfg.repeats,
        "pairs": len(pairs["defaults"]["fit"]),
        "bare_step_ms": round(1e3 * bare_step, 3),
        # Paired: the bare step plus each variant's framework time (the fits ran at different
        # times, so their own step times also carry the machine's drift).
        "paired_steps_per_s": {
            "bare_loop": round(1 / bare_step, 2),
            **{v: round(1e3 / (1e3 * bare_step + ms[v]), 2) for v in pairs},
        },
        "framework_ms_per_step": {v: round(x, 3) for v, x in ms.items()},
        "framework_ms_standard_error": {v: round(s["se_ms"], 3) for v, s in stats.items()},
        "framework_ms_median": {v: round(s["median_ms"], 3) for v, s in stats.items()},
        "framework_ms_per_fit": {v: s["fit_means_ms"] for v, s in stats.items()},
        "null_ms_per_step": round(null_stats["mean_ms"], 3),
        "null_ms_standard_error": round(null_stats["se_ms"], 3),
        "ratio": round(stats["defaults"]["ratio"], 4),
        "ratio_terminal": round(stats["terminal"]["ratio"], 4),
        "ratio_no_progress_bar": round(stats["no_progress_bar"]["ratio"], 4),
        "ratio_bare_trainer": round(stats["bare_trainer"]["ratio"], 4),
        "ratio_lightning_floor": round(stats["lightning_floor"]["ratio"], 4),
        # What this package adds to Lightning's own loop: the module's metrics and hooks, the
        # CLI's callbacks and logger.
        "ours_ms_per_step": round(ms["defaults"] - ms["lightning_floor"], 3),
        "target_ours_ms": target.get("ours_ms"),
        "ours_met": None
        if target.get("ours_ms") is None
        else bool(ms["defaults"] - ms["lightning_floor"] <= target["ours_ms"]),
        # Whether the target lies under what Lightning's loop costs a stock module that does
        # nothing but the step.
        "target_below_lightning_floor": bool(
            target.get("framework_ms") is not None and ms["lightning_floor"] > target["framework_ms"]
        ),
        "target_ratio": target["ratio"],
        "target_framework_ms": target.get("framework_ms"),
        "target_where": target["where"],
        "profile": profile_fit(cfg, arch, bs, steps=min(200, cfg.timed_steps)),
    }
