"""No dead recipe: every recipe in configs/ trains a few steps on the real images and must learn.

Each recipe runs as written (its network, optimizer, schedule, batch size, augmentation and
callbacks) for the steps in ``SMOKE``; the thresholds and how they were chosen are in
``cifar_lightning/tools/recipe_check.py`` and ``benchmarks/recipe_smoke.md``. A recipe added to
configs/ without a ``SMOKE`` entry fails here until it has been measured.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar_lightning.tools import recipe_check
from cifar_lightning.tools.recipe_check import CHANCE_LOSS, SMOKE, check_recipe, failures
from conftest import REPO

RECIPES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_learns_in_a_few_steps(recipe, real_cifar10, tmp_path):
    assert recipe in SMOKE, f"{recipe} has no smoke entry: measure it with scripts/check_recipes.py and add one"
    spec = SMOKE[recipe]
    if spec.learns:  # a threshold must say more than chance
        assert spec.max_loss < CHANCE_LOSS - 0.03 and spec.min_acc > 0.11
    result = check_recipe(REPO / "configs" / f"{recipe}.yaml", real_cifar10, spec.steps, tmp_path)
    assert failures(result, spec) == [], result.as_row()


class Constant(nn.Module):
    """A network whose output ignores its input: it can learn the class frequencies, nothing else."""

    def __init__(self, num_classes: int = 10, **kwargs) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), -1) + 0 * x.mean()


@pytest.mark.data
def test_a_network_that_outputs_constants_fails_the_check(real_cifar10, tmp_path, monkeypatch):
    import cifar_lightning.module as module_mod

    monkeypatch.setattr(module_mod, "create_model", lambda arch, num_classes=10, **kw: Constant(num_classes))
    spec = SMOKE["resnet20_paper"]
    result = check_recipe(REPO / "configs" / "resnet20_paper.yaml", real_cifar10, spec.steps, tmp_path)
    missed = failures(result, spec)
    assert any("training loss" in m for m in missed) and any("validation accuracy" in m for m in missed)
    assert result.late_loss > CHANCE_LOSS - 0.05  # about ln(10): the best a constant can do on balanced classes
    # and the recipe checked only for movement fails too
    monkeypatch.setattr(module_mod, "create_model", lambda arch, num_classes=10, **kw: Constant(num_classes))
    spec = SMOKE["resnet34_tutorial"]
    result = check_recipe(REPO / "configs" / "resnet34_tutorial.yaml", real_cifar10, spec.steps, tmp_path / "r34")
    assert any("nothing moves" in m for m in failures(result, spec))


def test_every_smoke_entry_names_a_recipe():
    assert set(SMOKE) <= set(RECIPES), set(SMOKE) - set(RECIPES)
    assert recipe_check.VAL_IMAGES >= 500  # enough validation images that 10% + noise stays under each floor
