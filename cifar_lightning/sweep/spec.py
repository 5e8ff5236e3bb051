"""A sweep file: what a study tunes, on what, how it samples and when it prunes.

A sweep file is YAML::

    recipe: ../resnet20_paper.yaml    # the base recipe, relative to this file (or none: the defaults)
    metric: val/acc                   # what the study optimises, on the validation split
    direction: maximize
    n_trials: 32                      # the study's size: trials finished or running, all workers
    fit_args: [--epochs, "30"]        # scripts/fit.py arguments of every trial
    space:                            # keyed by the LightningCLI's own names
      model.lr: {type: float, low: 0.02, high: 0.5, log: true}
      model.weight_decay: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      data.augment: {type: categorical, choices: [standard, trivialaugment]}
    sampler: {type: tpe, seed: 0}     # tpe or random, with their Optuna arguments
    pruner: {type: median, n_warmup_steps: 2}   # median, successive_halving, hyperband or none
    quick: {n_trials: 8, fit_args: [...], pruner: {...}}   # --quick: a size that finishes on a CPU

``load_sweep`` reads and checks it: an unknown key, a wrong type or an empty range gets one
``UserError`` naming the key, before any trial runs (the space's values are then also checked
against the CLI itself, ``runner.preflight``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from cifar_lightning.errors import UserError

#: The samplers and pruners a sweep file names, and the Optuna classes they build.
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}
DIRECTIONS = ("maximize", "minimize")

#: The exit code of a trial's process when the study's pruner stopped it.
PRUNED_EXIT = 3
TOP_KEYS = {"recipe", "metric", "direction", "n_trials", "fit_args", "space", "sampler", "pruner", "quick"}
QUICK_KEYS = {"n_trials", "fit_args", "pruner"}
PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
#: The CLI's sections a parameter may belong to.
SECTIONS = ("model.", "data.", "trainer.", "checkpoint.")


@dataclass(frozen=True)
class SweepSpec:
    """A checked sweep file (``--quick`` already applied)."""

    path: Path
    recipe: Path | None
    metric: str
    direction: str
    space: dict[str, BaseDistribution]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int
    fit_args: list[str] = field(default_factory=list)

    def make_sampler(self, offset: int = 0) -> optuna.samplers.BaseSampler:
        """The sampler the file names, with its arguments, its seed moved by ``offset``."""
        args = {k: v for k, v in self.sampler.items() if k != "type"}
        if args.get("seed") is not None:
            args["seed"] = (args["seed"] + offset) % 2**32
        return SAMPLERS[self.sampler["type"]](**args)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        """The pruner the file names, with its arguments."""
        return build_pruner(self.pruner)

    def recipe_args(self) -> list[str]:
        """``--config RECIPE`` where the file names one."""
        return ["--config", str(self.recipe)] if self.recipe else []


def build_pruner(spec: dict[str, Any]) -> optuna.pruners.BasePruner:
    """A pruner from its sweep-file entry (``{"type": "median", ...}``). A trial's own process
    builds it too: pruning is decided where the trial reports, and a study loaded from storage
    would otherwise get Optuna's default pruner."""
    return PRUNERS[spec["type"]](**{k: v for k, v in spec.items() if k != "type"})


def cli_value(value: Any) -> str:
    """A parameter's value as the CLI reads it (``true`` for True, JSON for lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)) or value is None:
        return json.dumps(value)
    return str(value)


def param_args(params: dict[str, Any]) -> list[str]:
    """The CLI arguments that set ``params`` (``{"model.lr": 0.1}`` -> ``["--model.lr=0.1"]``)."""
    return [f"--{key}={cli_value(value)}" for key, value in params.items()]


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def _distribution(path: Path, key: str, entry: Any) -> BaseDistribution:
    if not key.startswith(SECTIONS) or key.count(".") < 1:
        raise UserError(f"{_where(path, 'space')}: {key!r} is not a CLI name; use e.g. model.lr or data.augment")
    if not isinstance(entry, dict) or entry.get("type") not in PARAM_KEYS:
        raise UserError(
            f"{_where(path, 'space.' + key)}: give a mapping with type float, int or categorical, "
            f"e.g. {{type: float, low: 0.01, high: 0.5, log: true}}"
        )
    kind = entry["type"]
    unknown = set(entry) - PARAM_KEYS[kind]
    if unknown:
        raise UserError(
            f"{_where(path, 'space.' + key)}: unknown key {sorted(unknown)[0]!r} for a {kind} "
            f"parameter; valid keys: {', '.join(sorted(PARAM_KEYS[kind]))}"
        )
    try:
        if kind == "categorical":
            choices = entry.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError("choices must be a non-empty list")
            return CategoricalDistribution(choices)
        for bound in ("low", "high"):
            value = entry.get(bound)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{bound} must be a number, got {value!r}")
        if not entry["low"] < entry["high"]:
            raise ValueError(f"low ({entry['low']}) must be below high ({entry['high']})")
        if kind == "int":
            if not all(float(entry[b]).is_integer() for b in ("low", "high")):
                raise ValueError("low and high of an int parameter must be whole numbers")
            return IntDistribution(
                int(entry["low"]), int(entry["high"]), log=bool(entry.get("log", False)), step=int(entry.get("step", 1))
            )
        return FloatDistribution(
            float(entry["low"]), float(entry["high"]), log=bool(entry.get("log", False)), step=entry.get("step")
        )
    except (ValueError, TypeError) as err:
        raise UserError(f"{_where(path, 'space.' + key)}: {err}") from None


def _string_list(path: Path, key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise UserError(f"{_where(path, key)}: give a list of scripts/fit.py arguments, e.g. [--epochs, '30']")
    return [str(v) for v in value]


def _named(path: Path, key: str, value: Any, table: dict[str, Any], default: str) -> dict[str, Any]:
    spec = {"type": default} if value is None else value
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or spec.get("type") not in table:
        raise UserError(f"{_where(path, key)}: type must be one of {', '.join(table)}, got {spec!r}")
    try:
        table[spec["type"]](**{k: v for k, v in spec.items() if k != "type"})  # its arguments are checked here
    except (TypeError, ValueError) as err:
        raise UserError(f"{_where(path, key)}: {err}") from None
    return dict(spec)


def load_sweep(path: str | Path, quick: bool = False) -> SweepSpec:
    """Read and check a sweep file; ``quick`` applies its ``quick`` section."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no sweep file {path}: give a YAML file such as configs/sweeps/resnet20.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a sweep file is a mapping with recipe, metric, space, ...")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key {sorted(unknown)[0]!r}; valid keys: {', '.join(sorted(TOP_KEYS))}")
    recipe = raw.get("recipe")
    recipe_path = None
    if recipe is not None:
        recipe_path = (path.parent / recipe) if not Path(recipe).is_absolute() else Path(recipe)
        if not recipe_path.is_file():
            raise UserError(f"{_where(path, 'recipe')}: no recipe {recipe_path} (a path relative to the sweep file)")
    metric, direction = raw.get("metric", "val/acc"), raw.get("direction", "maximize")
    if not isinstance(metric, str) or not metric.startswith("val/"):
        raise UserError(
            f"{_where(path, 'metric')}: a study optimises a validation metric (val/acc, val/loss), "
            f"never the test set; got {metric!r}"
        )
    if direction not in DIRECTIONS:
        raise UserError(f"{_where(path, 'direction')}: maximize or minimize, got {direction!r}")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise UserError(
            f"{_where(path, 'space')}: give at least one parameter, e.g. model.lr: "
            "{type: float, low: 0.01, high: 0.5, log: true}"
        )
    quick_section = raw.get("quick") or {}
    if not isinstance(quick_section, dict) or set(quick_section) - QUICK_KEYS:
        raise UserError(f"{_where(path, 'quick')}: a mapping of {', '.join(sorted(QUICK_KEYS))}")
    n_trials = quick_section.get("n_trials", raw.get("n_trials", 20)) if quick else raw.get("n_trials", 20)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise UserError(f"{_where(path, 'n_trials')}: a positive whole number, got {n_trials!r}")
    fit_args = _string_list(path, "fit_args", raw.get("fit_args"))
    if quick:
        fit_args += _string_list(path, "quick.fit_args", quick_section.get("fit_args"))
    return SweepSpec(
        path=path,
        recipe=recipe_path,
        metric=metric,
        direction=direction,
        space={key: _distribution(path, key, entry) for key, entry in space.items()},
        sampler=_named(path, "sampler", raw.get("sampler"), SAMPLERS, "tpe"),
        pruner=_named(
            path,
            "pruner",
            quick_section.get("pruner", raw.get("pruner")) if quick else raw.get("pruner"),
            PRUNERS,
            "median",
        ),
        n_trials=n_trials,
        fit_args=fit_args,
    )


def extremes(space: dict[str, BaseDistribution]) -> list[dict[str, Any]]:
    """Parameter sets that together reach every bound and every choice of ``space``: the values
    a study can draw that are most likely to be refused."""
    count = max([2] + [len(d.choices) for d in space.values() if isinstance(d, CategoricalDistribution)])
    sets = []
    for i in range(count):
        params = {}
        for key, d in space.items():
            if isinstance(d, CategoricalDistribution):
                params[key] = d.choices[i % len(d.choices)]
            else:
                params[key] = d.low if i % 2 == 0 else d.high
        sets.append(params)
    return sets


def suggest(trial: optuna.Trial, key: str, dist: BaseDistribution) -> Any:
    """``trial``'s value for ``key``, drawn from ``dist`` by the study's sampler."""
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
