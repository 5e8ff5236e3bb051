"""No dead recipe: every recipe in configs/ trains a few steps on the real images and must learn.

Each recipe runs as written (its network, optimizer, schedule, batch size, augmentation and
callbacks) for the steps in ``SMOKE``; the thresholds and how they were chosen are in
``benchmarks/recipe_check.py`` and ``benchmarks/recipe_smoke.md``. A recipe added to
configs/ without a ``SMOKE`` entry fails here until it has been measured.

The check itself is tested by breaking recipes: for each kind of check, a network that outputs
constants, an optimizer that never steps, a run that diverges and a validation at chance must
each fail it.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REPO
from torch import nn

from benchmarks import recipe_check
from benchmarks.recipe_check import CHANCE_LOSS, SMOKE, SmokeResult, SmokeSpec, check_recipe, failures

RECIPES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("recipe", RECIPES)
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
