"""A recipe that cannot learn is caught in minutes: a short run of each recipe on real images.

``check_recipe`` trains a recipe as written (its network, optimizer, schedule, batch size,
augmentation and callbacks, through the same CLI as ``scripts/fit.py``) for a few steps, the
schedule laid over those steps as ``--trainer.max_steps`` lays it, then validates on a fixed
sample of held-out training images. A network that learns brings the training loss below ln(10)
= 2.303, the loss of a uniform guess, and the accuracy above the 10% of chance; one that outputs
constants or is stuck (a bad initialisation, a wrong learning rate, a broken loader) does neither.

``python scripts/check_recipes.py --data-dir DIR`` prints the measured figures next to each
recipe's thresholds (``SMOKE``); the slow and long tests assert them (tests/test_recipes.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch

from benchmarks import REPO
from benchmarks.fitting import build_fit, quiet_args
from benchmarks.smoke_specs import (  # noqa: F401 (its interface)
    CHANCE_LOSS,
    EPOCH_SETTINGS,
    LONG_SMOKE,
    SAME_SMOKE_RUN,
    SMOKE,
    SMOKE_BLIND,
    TAIL,
    VAL_IMAGES,
    SmokeSpec,
)
from cifar_lightning.errors import UserError, exit_on_user_error
from cifar_lightning.report import write_report


def smoothing_floor(label_smoothing: float, num_classes: int = 10) -> float:
    """The lowest cross-entropy a perfect prediction reaches under ``label_smoothing``: the entropy
    of the smoothed target (0.50 at 0.1 for 10 classes)."""
    eps = label_smoothing
    if eps <= 0:
        return 0.0
    top, rest = 1 - eps + eps / num_classes, eps / num_classes
    return -(top * math.log(top) + (num_classes - 1) * rest * math.log(rest))


@dataclass
class SmokeResult:
    """What one smoke run measured: the data run, and the one-batch fit where the kind has one."""

    recipe: str
    steps: int
    batch_size: int
    losses: list[float]
    val_loss: float
    val_acc: float
    seconds: float
    batch_losses: list[float] = field(default_factory=list)
    batch_acc: float | None = None
    batch_floor: float = 0.0

    @property
    def quarter(self) -> int:
        return max(1, len(self.losses) // 4)

    @property
    def early_loss(self) -> float:
        """Mean training loss over the first quarter of the steps (at least one)."""
        head = self.losses[: self.quarter]
        return sum(head) / len(head)

    @property
    def late_loss(self) -> float:
        """Mean training loss over the last quarter of the steps (at least one)."""
        tail = self.losses[-self.quarter :]
        return sum(tail) / len(tail)

    @property
    def batch_loss(self) -> float | None:
        """Mean loss of the one-batch fit's last ``TAIL`` steps."""
        tail = self.batch_losses[-TAIL:]
        return sum(tail) / len(tail) if tail else None

    def as_row(self) -> dict[str, Any]:
        row = {
            "recipe": self.recipe,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "first_loss": round(self.losses[0], 4),
            "early_loss": round(self.early_loss, 4),
            "late_loss": round(self.late_loss, 4),
            "val_loss": round(self.val_loss, 4),
            "val_acc": round(self.val_acc, 4),
            "seconds": round(self.seconds, 1),
        }
        if self.batch_losses:
            row |= {
                "batch_steps": len(self.batch_losses),
                "batch_loss": round(self.batch_loss, 4),
                "batch_floor": round(self.batch_floor, 4),
                "batch_acc": round(self.batch_acc, 4),
            }
        return row


class _StepLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


class _StopAfter(pl.Callback):
    """Ends the fit after ``steps`` optimizer steps, whatever the schedule was sized for."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class _SameBatch:
    """One fixed batch, ``n`` times: a training loader for the one-batch fit."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield self.x, self.y


def _recipe_cli(recipe: str | Path, data_dir, steps: int | None, root_dir, seed: int, overrides: Sequence[str]):
    """The CLI's objects for ``recipe`` as written, laid over ``steps`` steps (None: its own length),
    built but not run. It validates once, after training (``_validate``)."""
    args = [
        *quiet_args(data_dir, root_dir, seed),
        "--data.num_workers=0",
        f"--data.val_size={VAL_IMAGES}",
        # Channels-last convolutions: the same arithmetic, about a quarter cheaper on a CPU.
        "--model.channels_last=true",
        *([f"--trainer.max_steps={steps}"] if steps else []),
        "--trainer.num_sanity_val_steps=0",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_model_summary=false",
        *overrides,
    ]
    # The check judges a lost loss itself, from every step's loss, and goes on to its verdict.
    return build_fit(recipe, args, checkpoints=True, loss_guard=False)


#: Training images of CIFAR-10, the only dataset with smoke thresholds (``other_dataset``).
TRAIN_IMAGES = 50_000


def smoke_config(recipe: str | Path, data_dir, steps: int, root_dir) -> dict[str, Any]:
    """``recipe``'s settings as its smoke run of ``steps`` steps has them (its overrides applied),
    as dotted keys; the recipe file's own path left out. Built, nothing trained."""
    config = _recipe_cli(recipe, data_dir, steps, root_dir, 0, ()).config.clone()
    config.pop("config", None)
    return {key: config[key] for key in config.keys() if not isinstance(config[key], type(config))}


def _epoch_bound(config: dict[str, Any], steps: int) -> str | None:
    """Why the epoch's length or count shapes ``config``'s smoke run of ``steps`` steps: the run
    crosses an epoch's end (where epoch-keyed settings act) or stops at it, or its schedule is
    counted in epochs. None when the run stays within a first epoch that its length does not shape."""
    limit = config.get("trainer.limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = limit
    else:  # a fraction of the training images held in (Lightning rounds up; this may undercount)
        held_in = (TRAIN_IMAGES - VAL_IMAGES) * (1.0 if limit is None else limit)
        batches = int(held_in) // config["data.batch_size"]
    per_epoch = batches // (config.get("trainer.accumulate_grad_batches") or 1)
    if per_epoch < steps:
        return f"its first epoch holds {per_epoch} optimizer steps, fewer than the smoke run's {steps}"
    if config.get("model.warmup_epochs"):
        return "its warm-up is counted in epochs"
    if config.get("model.milestones") and config.get("model.milestone_unit") == "epoch":
        return "its milestones are counted in epochs"
    return None


def smoke_differences(recipe: str | Path, other: str | Path, data_dir, steps: int, root_dir) -> list[str]:
    """Why the smoke runs of ``recipe`` and ``other`` (a ``learns`` run of ``steps`` steps, its
    schedule laid over them) do not train the same: the settings they differ in beyond
    ``SMOKE_BLIND``, the epoch's ones included where the epoch shapes either run (``_epoch_bound``).
    Empty when one's training steps stand for the other's."""
    mine = smoke_config(recipe, data_dir, steps, root_dir)
    theirs = smoke_config(other, data_dir, steps, root_dir)
    bound = [f"{Path(n).stem}: {why}" for n, c in ((recipe, mine), (other, theirs)) if (why := _epoch_bound(c, steps))]
    blind = SMOKE_BLIND - (EPOCH_SETTINGS if bound else frozenset())
    out = [
        f"{key}: {mine.get(key)!r} in {Path(recipe).stem}, {theirs.get(key)!r} in {Path(other).stem}"
        for key in sorted(mine.keys() | theirs.keys())
        if key not in blind and mine.get(key) != theirs.get(key)
    ]
    return out + [f"{b}, so its epoch settings count" for b in bound] if out else out


def _validate(trainer: pl.Trainer, model, root_dir, **loaders) -> dict[str, float]:
    # A fresh trainer for validation: the fit's one has limit_val_batches 0.
    (metrics,) = pl.Trainer(
        accelerator=trainer.accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(root_dir),
    ).validate(model, verbose=False, **loaders)
    return metrics


def fit_one_batch(
    recipe: str | Path, data_dir, spec: SmokeSpec, root_dir, seed: int = 0, overrides: Sequence[str] = ()
) -> tuple[list[float], float, float]:
    """The recipe fits ``spec.batch_images`` fixed training images for ``spec.batch_steps`` steps;
    returns its step losses, its eval-mode accuracy on that batch (the validation step) and the
    lowest loss its label smoothing allows."""
    from torch.utils.data import DataLoader, TensorDataset

    cli = _recipe_cli(recipe, data_dir, spec.batch_steps, Path(root_dir) / "one_batch", seed, overrides)
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    dm.setup("fit")
    x = dm.sample_train_images(spec.batch_images)  # a fair sample of the classes
    y = torch.as_tensor(np.asarray(dm.train_set.labels)[dm.sample_train_indices(spec.batch_images)])
    n = len(x)
    # The recipe's optimizer and hyperparameters under a short schedule (read when the fit starts).
    hp = model.hparams
    hp.lr *= spec.batch_lr_scale
    hp.scheduler, hp.warmup_epochs, hp.min_lr = "cosine", 0.3, 0.0
    losses = _StepLosses()
    trainer.callbacks.append(losses)
    model.init_network_from(dm)  # as a fit with the data module would
    trainer.fit(model, train_dataloaders=_SameBatch(x, y, spec.batch_steps))
    batch = DataLoader(TensorDataset(x, y), batch_size=n)
    # Batch-norm running statistics trail the weights by tens of steps (momentum 0.1), and the
    # weights moved until the schedule's last steps; recompute them on the batch, as
    # torch.optim.swa_utils does for averaged weights, so that eval mode sees the learnt network.
    torch.optim.swa_utils.update_bn(((bx,) for bx, _ in batch), model)
    metrics = _validate(trainer, model, root_dir, dataloaders=batch)
    return losses.losses, float(metrics["val/acc"]), smoothing_floor(hp.label_smoothing, dm.num_classes)


def check_recipe(
    recipe: str | Path,
    data_dir: str | Path,
    spec: SmokeSpec | int,
    root_dir: str | Path,
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> SmokeResult:
    """The smoke run of ``recipe`` on ``data_dir``: ``spec.steps`` steps on the data, validated on
    ``VAL_IMAGES`` held-out images, and the one-batch fit for ``kind="overfit"``. ``overrides``
    are CLI arguments after the recipe's (the mutation tests break a recipe with them)."""
    spec = SmokeSpec(spec) if isinstance(spec, int) else spec
    own_schedule = spec.schedule == "recipe"
    cli = _recipe_cli(recipe, data_dir, None if own_schedule else spec.steps, root_dir, seed, overrides)
    losses = _StepLosses()
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    trainer.callbacks += [losses, _StopAfter(spec.steps)] if own_schedule else [losses]
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    metrics = _validate(trainer, model, root_dir, datamodule=dm)
    result = SmokeResult(
        recipe=Path(recipe).stem,
        steps=trainer.global_step,
        batch_size=dm.hparams.batch_size,
        losses=losses.losses,
        val_loss=float(metrics["val/loss"]),
        val_acc=float(metrics["val/acc"]),
        seconds=0.0,
    )
    if spec.kind == "overfit":
        result.batch_losses, result.batch_acc, result.batch_floor = fit_one_batch(
            recipe, data_dir, spec, root_dir, seed, overrides
        )
    result.seconds = time.perf_counter() - start
    return result


def failures(result: SmokeResult, spec: SmokeSpec) -> list[str]:
    """What a smoke run missed, as sentences; empty when it passed."""
    out = []
    if result.steps != spec.steps:
        out.append(f"ran {result.steps} steps, not {spec.steps}")
    if not result.losses:
        return out + ["no training step ran"]
    if not all(math.isfinite(x) for x in result.losses + result.batch_losses):
        return out + ["the training loss is not finite: the run diverged"]
    if not result.late_loss < result.early_loss:
        out.append(
            f"training loss rose or stood still: {result.early_loss:.3f} over the first quarter of the steps, "
            f"{result.late_loss:.3f} over the last"
        )
    if spec.kind == "learns":
        if not result.late_loss < spec.max_loss:
            out.append(f"training loss {result.late_loss:.3f} is not below {spec.max_loss} (chance: {CHANCE_LOSS:.3f})")
        if not result.val_acc > spec.min_acc:
            out.append(f"validation accuracy {result.val_acc:.3f} is not above {spec.min_acc} (chance: 0.1)")
        return out
    if len(result.batch_losses) != spec.batch_steps:
        out.append(f"the one-batch fit ran {len(result.batch_losses)} steps, not {spec.batch_steps}")
    elif not result.batch_loss - result.batch_floor < spec.max_batch_loss:
        out.append(
            f"one fixed batch was not learnt: loss {result.batch_loss:.3f} after {spec.batch_steps} steps, "
            f"not within {spec.max_batch_loss} of its floor {result.batch_floor:.3f} (chance: {CHANCE_LOSS:.3f})"
        )
    if result.batch_acc is None or not result.batch_acc > spec.min_batch_acc:
        out.append(f"eval-mode accuracy on the learnt batch {result.batch_acc} is not above {spec.min_batch_acc}")
    return out


def recipe_sha256(recipe: str | Path) -> str:
    """The sha256 of a recipe file's bytes: a smoke row records the file it ran."""
    return hashlib.sha256(Path(recipe).read_bytes()).hexdigest()


def recipe_dataset(recipe: str | Path) -> str | None:
    """The dataset a recipe names (``data.dataset``), None when it takes what the data holds."""
    import yaml

    return (yaml.safe_load(Path(recipe).read_text()).get("data") or {}).get("dataset")


def other_dataset(recipe: str | Path, data_dir: str | Path) -> str | None:
    """Why ``recipe`` cannot run on ``data_dir``: it is for another dataset than the data holds (a
    recipe that names none is a CIFAR-10 one: its reference and thresholds are); else None."""
    from cifar_lightning.data.sources import resolve_source

    wanted = recipe_dataset(recipe) or "cifar10"
    try:  # named, as the run names it: a folder holding both torchvision datasets is read for it
        resolve_source(data_dir, download=False, dataset=wanted)
    except UserError as err:
        return f"a {wanted} recipe, and {data_dir} does not hold {wanted} ({err})"
    return None


def run_all(
    names: list[str], configs: Path, data_dir: str, root_dir: Path, steps: int | None = None
) -> list[tuple[SmokeResult, SmokeSpec | None]]:
    """Smoke runs of ``names`` with ``SMOKE``'s steps (or ``steps``), each printed as it finishes;
    a recipe for another dataset than ``data_dir`` holds is skipped, with a line that says so."""
    results = []
    for name in names:
        skip = other_dataset(configs / f"{name}.yaml", data_dir)
        if skip:
            print(f"{name}: skipped: {skip}", flush=True)
            continue
        spec = SMOKE.get(name)
        n = steps or (spec.steps if spec else 50)
        result = check_recipe(configs / f"{name}.yaml", data_dir, spec if spec and not steps else n, root_dir / name)
        missed = failures(result, spec) if spec else ["no SMOKE entry: add one to benchmarks/recipe_check.py"]
        print(f"{name}: {result.as_row()} {'ok' if not missed else 'FAILED: ' + '; '.join(missed)}", flush=True)
        results.append((result, spec))
    return results


def smoke_markdown(rows: list[dict[str, Any]], prov: dict[str, Any]) -> str:
    """The smoke results as a markdown page: measured figures beside each recipe's thresholds."""
    m = prov["machine"]
    busy = (
        " The machine was busy with other work during the run (load average up to "
        f"{prov['load_average_1min_max']} on {m['cpu_cores']} cores), so the seconds are upper bounds."
        if prov.get("machine_busy")
        else ""
    )
    lines = [
        "# Recipe smoke checks",
        "",
        f"Generated by `{prov['command']}` at commit `{(prov['commit'] or 'unknown')[:12]}`"
        f"{' with uncommitted changes' if prov['uncommitted_changes'] else ''}, {prov['started'][:10]}, on "
        f"{m['cpu']} ({m['cpu_cores']} cores), one torch thread per run, torch {prov['versions']['torch']}, data "
        f"`{(prov.get('data') or {}).get('name')}`.{busy} Full provenance in `recipe_smoke.json`.",
        "",
        "What each check shows. Every recipe trains as written (network, optimizer, schedule, batch size, "
        "augmentation, callbacks; channels-last convolutions) on the real training images for the steps below "
        f"(the data run), then validates on {VAL_IMAGES} held-out training images. ln(10) = {CHANCE_LOSS:.3f} is the "
        "loss of a uniform guess and 10% the accuracy of chance. Every data run must stay finite and end lower "
        "than it started (mean loss of the last quarter of its steps below that of the first quarter).",
        "",
        "- **learns**: the data run must also bring its late loss below the ceiling and its validation accuracy "
        "above the floor. Both must hold: a constant guess can beat 10% on a 512-image sample, but keeps "
        "its loss at ln(10). This shows the recipe learns from the data.",
        "- **overfit**: recipes whose first steps cannot show learning on one core in a test's budget (deep "
        "networks at SGD 0.1 from the first step blow the loss up for tens of steps). Their network, optimizer "
        "and callbacks fit one fixed batch of 64 unaugmented training images, the learning rate times the scale "
        "in the table, under a short schedule (warm-up over 30% of the steps, then cosine to 0). The mean loss of "
        f"the last {TAIL} steps must come within 0.5 of the floor the recipe's label smoothing allows, and the "
        "model in eval mode (batch-norm statistics recomputed on the batch) must classify it above the accuracy floor. This shows the network, the "
        "optimizer and the eval path work; the data run shows the recipe's own schedule does not diverge. "
        "It does not show the recipe reaches its accuracy: its full run does (`benchmarks/reproduce.md`).",
        "",
        "Each kind fails a network that outputs constants, an optimizer that never steps (lr 1e-12), a run that "
        "diverges (lr 1e4) and a validation at chance (shuffled labels): `tests/test_recipes.py`.",
        "",
        "| recipe | kind | steps | batch | first loss | early / late loss (quarters) | late below | val acc | above "
        "| one batch: steps, lr scale, loss (floor), eval acc | seconds | passed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        learns = r.get("kind", "learns") == "learns"
        ceiling = r["max_loss"] if learns else "-"
        floor = f"{100 * r['min_acc']:.0f}%" if learns else "-"
        one = "-"
        if "batch_loss" in r:
            one = (
                f"{r['batch_steps']}, x{r['batch_lr_scale']:g}, {r['batch_loss']:.3f} ({r['batch_floor']:.2f}), "
                f"{100 * r['batch_acc']:.0f}% (> {100 * r['min_batch_acc']:.0f}%)"
            )
        lines.append(
            f"| {r['recipe']} | {r.get('kind', 'learns')} | {r['steps']} | {r['batch_size']} | {r['first_loss']:.3f} "
            f"| {r['early_loss']:.3f} / {r['late_loss']:.3f} | {ceiling} | {100 * r['val_acc']:.1f}% | {floor} "
            f"| {one} | {r['seconds']:.0f} | {'yes' if r['passed'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``scripts/check_recipes.py``: smoke-run recipes, print and save the figures."""
    import argparse
    import tempfile
    from dataclasses import asdict

    from benchmarks.provenance import finish, provenance

    p = argparse.ArgumentParser(description="Smoke-check recipes on real images: a few steps each must learn.")
    p.add_argument("recipes", nargs="*", help="recipe names (default: every recipe in --configs)")
    p.add_argument("--data-dir", required=True, help="image folder or archive of CIFAR-10 (real images)")
    p.add_argument("--configs", type=Path, default=REPO / "configs", help="the recipes folder (default: this clone's)")
    p.add_argument(
        "--output",
        type=Path,
        default=REPO / "benchmarks" / "recipe_smoke.json",
        help="JSON of the results; a .md beside it (default: benchmarks/recipe_smoke.json)",
    )
    p.add_argument("--steps", type=int, help="steps for every recipe instead of each one's own (calibration)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as each test worker uses)")
    args = p.parse_args(argv)
    names = args.recipes or sorted(f.stem for f in args.configs.glob("*.yaml"))
    missing = [n for n in names if not (args.configs / f"{n}.yaml").is_file()]
    if missing:
        raise UserError(f"no recipe {missing[0]!r} in {args.configs}/")
    torch.set_num_threads(args.threads)
    prov = provenance(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(names, args.configs, args.data_dir, Path(tmp), args.steps)
    rows = []
    for result, spec in results:
        row = result.as_row() | {"losses": [round(x, 4) for x in result.losses]}
        if result.batch_losses:
            row["batch_losses"] = [round(x, 4) for x in result.batch_losses]
        if spec is not None:
            row |= {k: v for k, v in asdict(spec).items() if k != "steps"}
        row["recipe_sha256"] = recipe_sha256(args.configs / f"{result.recipe}.yaml")
        row["passed"] = spec is not None and not failures(result, spec) and not args.steps
        rows.append(row)
    prov = finish(prov)
    if args.output and not args.steps:
        # A run over some recipes updates their rows and keeps the others' (each row says when).
        old = json.loads(args.output.read_text()).get("results", []) if args.output.is_file() else []
        for row in rows:
            row["commit"], row["date"] = prov["commit"], prov["started"][:10]
        merged = {r["recipe"]: r for r in old} | {r["recipe"]: r for r in rows}
        ordered = sorted(merged.values(), key=lambda r: r["recipe"])
        write_report({"provenance": prov, "results": ordered}, args.output)
        args.output.with_suffix(".md").write_text(smoke_markdown(ordered, prov))
    return rows
