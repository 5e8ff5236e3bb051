"""No dead recipe: the recipes in configs/ train a few steps on the real images and must learn.

Each recipe runs as written (its network, optimizer, schedule, batch size, augmentation and
callbacks) for the steps in ``SMOKE``; the thresholds and how they were chosen are in
``benchmarks/recipe_check.py`` and ``benchmarks/recipe_smoke.md``. A recipe added to
configs/ without a ``SMOKE`` entry fails here until it has been measured. The slowest runs
(``LONG_SMOKE``) are ``-m long``, and CI holds their recorded runs to the recipe files; a recipe
whose smoke run trains as another's (``SAME_SMOKE_RUN``) is checked by comparing their settings.

The check itself is tested by breaking recipes: for each kind of check, a network that outputs
constants, an optimizer that never steps, a run that diverges and a validation at chance must
each fail it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import REPO
from torch import nn

from benchmarks import recipe_check
from benchmarks.recipe_check import (
    CHANCE_LOSS,
    LONG_SMOKE,
    SAME_SMOKE_RUN,
    SMOKE,
    SmokeResult,
    SmokeSpec,
    check_recipe,
    failures,
    smoke_differences,
)

RECIPES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
#: The recipes trained here; the others' smoke run is one of these (test_a_variant_...).
RUN_RECIPES = [r for r in RECIPES if r not in SAME_SMOKE_RUN]
SMOKE_ROWS = {r["recipe"]: r for r in json.loads((REPO / "benchmarks" / "recipe_smoke.json").read_text())["results"]}


def _smoke_marks(recipe: str) -> list:
    # The heavy recipes' runs are -m long (LONG_SMOKE); CI checks their recorded runs instead.
    return [pytest.mark.long] if recipe in LONG_SMOKE else [pytest.mark.slow]


@pytest.mark.data
@pytest.mark.parametrize("recipe", [pytest.param(r, marks=_smoke_marks(r)) for r in RUN_RECIPES])
def test_recipe_learns_in_a_few_steps(recipe, real_cifar10, tmp_path):
    skip = recipe_check.other_dataset(REPO / "configs" / f"{recipe}.yaml", real_cifar10)
    if skip:  # the CIFAR-100 recipes: no copy of CIFAR-100 exists where these tests run
        pytest.skip(f"{skip}: no data for its smoke run here, so no thresholds measured for it")
    assert recipe in SMOKE, f"{recipe} has no smoke entry: measure it with scripts/check_recipes.py and add one"
    spec = SMOKE[recipe]
    if spec.kind == "learns":  # a threshold must say more than chance
        assert spec.max_loss < CHANCE_LOSS - 0.03 and spec.min_acc > 0.11
    else:
        assert spec.max_batch_loss <= CHANCE_LOSS / 4 and spec.min_batch_acc >= 0.5 and spec.batch_steps > 0
    result = check_recipe(REPO / "configs" / f"{recipe}.yaml", real_cifar10, spec, tmp_path)
    assert failures(result, spec) == [], result.as_row()


@pytest.fixture
def cifar10_classes(tmp_path) -> Path:
    from conftest import write_image_folder

    from cifar_lightning.constants import CIFAR10_CLASSES

    return write_image_folder(tmp_path / "c10", classes=CIFAR10_CLASSES, n_train=1, n_test=1)


@pytest.mark.parametrize("recipe", sorted(SAME_SMOKE_RUN))
def test_a_variant_recipe_is_its_parents_smoke_run(recipe, cifar10_classes, tmp_path):
    parent = SAME_SMOKE_RUN[recipe]
    assert parent in RUN_RECIPES and SMOKE[recipe] == SMOKE[parent]
    assert SMOKE[parent].kind == "learns" and SMOKE[parent].schedule == "laid_over_steps"  # what is compared
    configs = REPO / "configs"
    steps = SMOKE[parent].steps
    assert (
        smoke_differences(configs / f"{recipe}.yaml", configs / f"{parent}.yaml", cifar10_classes, steps, tmp_path)
        == []
    )
    # Its own smoke run on the real images is on record, passed, and followed its parent's losses.
    mine, theirs = SMOKE_ROWS[recipe], SMOKE_ROWS[parent]
    assert mine["passed"] and mine["steps"] == steps
    assert mine["losses"] == pytest.approx(theirs["losses"], abs=0.01)


@pytest.mark.parametrize("recipe", sorted(LONG_SMOKE))
def test_a_long_smoke_run_on_record_is_current(recipe):
    assert recipe in RUN_RECIPES
    row, spec = SMOKE_ROWS[recipe], SMOKE[recipe]
    assert row["passed"], row
    # A row holds its spec's fields (steps as the steps it ran).
    assert {k: row[k] for k in asdict(spec)} == asdict(spec), (
        f"SMOKE[{recipe!r}] changed since its smoke run: run python scripts/check_recipes.py {recipe} --data-dir DATA"
    )
    assert row.get("recipe_sha256") == recipe_check.recipe_sha256(REPO / "configs" / f"{recipe}.yaml"), (
        f"configs/{recipe}.yaml changed since its smoke run at {str(row.get('commit'))[:7]}: "
        f"run python scripts/check_recipes.py {recipe} --data-dir DATA"
    )


def test_a_setting_the_smoke_run_reaches_makes_another_run(cifar10_classes, tmp_path):
    parent = REPO / "configs" / "fastnet_muon.yaml"

    def variant(name: str, old: str, new: str, of: Path = parent) -> Path:
        text = of.read_text()
        assert old in text
        path = tmp_path / f"{name}.yaml"
        path.write_text(text.replace(old, new))
        return path

    def differences(path: Path, of: Path = parent, steps: int = 6) -> list[str]:
        return smoke_differences(path, of, cifar10_classes, steps, tmp_path / "runs")

    assert differences(variant("longer", "max_epochs: 8", "max_epochs: 30\n  limit_train_batches: 12")) == []
    assert any("model.lr" in d for d in differences(variant("lr", "lr: 106.0", "lr: 50.0")))
    assert any("data.augment" in d for d in differences(variant("augment", "augment: translate", "augment: none")))
    # An epoch shorter than the run: the run crosses epochs, so their count and length count.
    short = differences(variant("short", "max_epochs: 8", "max_epochs: 1\n  limit_train_batches: 4"))
    assert any("limit_train_batches" in d for d in short) and "fewer than the smoke run's 6" in short[-1], short
    # A warm-up counted in epochs: an epoch cut to 100 batches shortens it, even with 60 steps in it.
    resnet = REPO / "configs" / "resnet20_short.yaml"
    warm = differences(
        variant("warm", "max_epochs: 30", "max_epochs: 30\n  limit_train_batches: 100", resnet), resnet, 60
    )
    assert any("limit_train_batches" in d for d in warm) and "warm-up is counted in epochs" in warm[-1], warm


def test_only_recipes_for_another_dataset_are_skipped(tmp_path, tiny_folder):
    from conftest import write_image_folder

    from cifar_lightning.constants import CIFAR10_CLASSES

    cifar10 = write_image_folder(tmp_path / "c10", classes=CIFAR10_CLASSES, n_train=1, n_test=1)
    skipped = [r for r in RECIPES if recipe_check.other_dataset(REPO / "configs" / f"{r}.yaml", cifar10)]
    assert skipped == ["resnet18_cifar100", "resnet20_cifar100", "resnet56_cifar100"]
    # On data of other classes every recipe is skipped: their thresholds are CIFAR-10's or CIFAR-100's.
    assert all(recipe_check.other_dataset(REPO / "configs" / f"{r}.yaml", tiny_folder) for r in RECIPES)


class Constant(nn.Module):
    """A network whose output ignores its input: it can learn the class frequencies, nothing else."""

    def __init__(self, num_classes: int = 10, **kwargs) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), -1) + 0 * x.mean()


def _constant_network(monkeypatch):
    import cifar_lightning.module as module_mod

    monkeypatch.setattr(module_mod, "create_model", lambda arch, num_classes=10, **kw: Constant(num_classes))
    return []


def _validation_at_chance(monkeypatch):
    """The validation step sees labels unrelated to its images (a broken eval path)."""
    from cifar_lightning.module import ClassifierModule

    original = ClassifierModule.validation_step
    generator = torch.Generator().manual_seed(0)

    def shuffled(self, batch, batch_idx):
        x, y = batch
        return original(self, (x, y[torch.randperm(len(y), generator=generator)]), batch_idx)

    monkeypatch.setattr(ClassifierModule, "validation_step", shuffled)
    return []


MUTATIONS = {
    # mutation -> (how to apply it, words one of the failures must contain)
    "constant network": (_constant_network, ("training loss", "not learnt", "rose")),
    "optimizer never steps": (lambda mp: ["--model.lr=1e-12"], ("training loss", "not learnt", "rose")),
    "diverges": (lambda mp: ["--model.lr=1e4"], ("diverged", "rose")),
    "validation at chance": (_validation_at_chance, ("accuracy",)),
}

#: One recipe per kind of check, with its own spec.
KINDS = {"learns": "resnet20_paper", "overfit": "resnet56_paper"}


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_recipe_fails_the_check(kind, mutation, real_cifar10, tmp_path, monkeypatch):
    recipe = KINDS[kind]
    spec = SMOKE[recipe]
    assert spec.kind == kind
    apply, words = MUTATIONS[mutation]
    overrides = apply(monkeypatch)
    result = check_recipe(REPO / "configs" / f"{recipe}.yaml", real_cifar10, spec, tmp_path, overrides=overrides)
    missed = failures(result, spec)
    assert missed, f"{mutation} passed the {kind} check: {result.as_row()}"
    assert any(w in m for m in missed for w in words), missed


def _result(losses, val_acc=0.3, batch_losses=(), batch_acc=None, floor=0.0, steps=None) -> SmokeResult:
    return SmokeResult(
        recipe="x",
        steps=len(losses) if steps is None else steps,
        batch_size=8,
        losses=list(losses),
        val_loss=1.0,
        val_acc=val_acc,
        seconds=0.0,
        batch_losses=list(batch_losses),
        batch_acc=batch_acc,
        batch_floor=floor,
    )


def test_each_rule_of_the_check():
    learns = SmokeSpec(8, max_loss=2.1, min_acc=0.15)
    healthy = [2.3, 2.25, 2.2, 2.1, 2.0, 1.95, 1.9, 1.85]
    assert failures(_result(healthy), learns) == []
    assert any("not finite" in m for m in failures(_result([*healthy[:-1], math.nan]), learns))
    assert any("rose" in m for m in failures(_result([2.0, 1.9, 2.2, 2.4, 2.6, 3, 4, 6]), learns))
    assert any("not below 2.1" in m for m in failures(_result([2.31, 2.3, 2.3, 2.3, 2.3, 2.3, 2.29, 2.29]), learns))
    assert any("validation accuracy" in m for m in failures(_result(healthy, val_acc=0.1), learns))
    assert any("ran 7 steps" in m for m in failures(_result(healthy, steps=7), learns))

    overfit = SmokeSpec(8, kind="overfit", batch_steps=10)
    blown = [3.2, 8.0, 19.0, 9.0, 4.0, 3.0, 2.9, 2.8]  # up, then back below where it started
    learnt = [2.3, 1.5, 0.9, 0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.04]
    assert failures(_result(blown, val_acc=0.1, batch_losses=learnt, batch_acc=1.0), overfit) == []
    assert any("not learnt" in m for m in failures(_result(blown, batch_losses=[2.3] * 10, batch_acc=1.0), overfit))
    assert any("eval-mode" in m for m in failures(_result(blown, batch_losses=learnt, batch_acc=0.1), overfit))
    assert any(
        "not finite" in m for m in failures(_result(blown, batch_losses=[*learnt[:-1], math.inf], batch_acc=1), overfit)
    )
    # under label smoothing the floor is above 0: 0.55 is learnt at 0.1 (floor 0.50), not without it
    near = [2.3, 1.5, 0.9, 0.6, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55]
    assert failures(_result(blown, batch_losses=near, batch_acc=1.0, floor=0.5), overfit) == []
    assert any("not learnt" in m for m in failures(_result(blown, batch_losses=near, batch_acc=1.0), overfit))


def test_smoothing_floor_is_the_entropy_of_the_smoothed_target():
    assert recipe_check.smoothing_floor(0.0) == 0.0
    # a perfect prediction of the smoothed target: its cross-entropy with itself
    p = torch.full((10,), 0.01)
    p[0] = 0.91
    assert recipe_check.smoothing_floor(0.1) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)


def test_every_smoke_entry_names_a_recipe():
    assert set(SMOKE) <= set(RECIPES), set(SMOKE) - set(RECIPES)
    # Every CIFAR-10 recipe has been measured; the CIFAR-100 ones cannot be here (no copy of it).
    cifar10 = {r for r in RECIPES if recipe_check.recipe_dataset(REPO / "configs" / f"{r}.yaml") in (None, "cifar10")}
    assert cifar10 <= set(SMOKE), cifar10 - set(SMOKE)
    assert len(cifar10) == len(RECIPES) - 3
    assert recipe_check.VAL_IMAGES >= 500  # enough validation images that 10% + noise stays under each floor


def test_the_recipes_page_counts_and_names_each_kind():
    import re

    page = (REPO / "docs" / "recipes.md").read_text()
    learns = [r for r, spec in SMOKE.items() if spec.kind == "learns"]
    assert f"**learns** ({len(learns)} recipes)" in page
    overfit_text = page.split("**overfit** (", 1)[1].split("- **", 1)[0]

    def recipes_named(text: str) -> set[str]:
        return set(re.findall(r"\b[a-z][a-z0-9_]+_[a-z0-9_]+\b", text)) & set(RECIPES)

    named = recipes_named(overfit_text)
    assert named == {r for r, spec in SMOKE.items() if spec.kind == "overfit"}
    # Which recipes the slow tests leave out, and why.
    untried = " ".join(page.split("## No recipe goes untried", 1)[1].split())
    words = {6: "six", 7: "seven", 8: "eight", 9: "nine"}
    assert f"every recipe but {words[len(LONG_SMOKE) + len(SAME_SMOKE_RUN)]}:" in untried
    assert f"the {words[len(LONG_SMOKE)]} slowest (" in untried
    long_text = untried.split(f"the {words[len(LONG_SMOKE)]} slowest (", 1)[1].split(")", 1)[0]
    assert recipes_named(long_text) == LONG_SMOKE
