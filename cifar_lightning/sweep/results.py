"""What a study leaves for a person: the table of trials, the best configuration as a recipe, the
plots, and the one test of the best trial.

In the study's output folder:
- ``trials.md`` and ``trials.csv``: number, state, the metric, the parameters, epochs, seconds,
  the run directory and, for a failed trial, its error;
- ``best.yaml``: the base recipe with the sweep's arguments and the best trial's parameters laid
  over it, which ``scripts/fit.py --config best.yaml`` runs as it is;
- ``history.png``, ``importances.png``, ``parallel.png``: Optuna's matplotlib plots;
- ``summary.json``: the study, its counts, the best trial and its test.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from cifar_lightning.sweep.spec import SweepSpec
from cifar_lightning.sweep.storage import safe_url

#: CLI keys that say where one machine keeps things: never part of a recipe.
MACHINE_KEYS = (
    "data.data_dir",
    "data.download",
    "trainer.default_root_dir",
    "trainer.logger",
    "config",
    "checkpoint.dirpath",
    "ckpt_path",
)

#: How a trial's state is written: as the trial's own record says it (``failed``, not ``fail``).
STATE_NAMES = {state: ("failed" if state is TrialState.FAIL else state.name.lower()) for state in TrialState}

PLOTS = {
    "history.png": "plot_optimization_history",
    "importances.png": "plot_param_importances",
    "parallel.png": "plot_parallel_coordinate",
}


def _storage_name(url: str, out: Path) -> str:
    """The storage as the summary names it: the default SQLite file by its place in the study's
    folder, any other without its password."""
    if url.startswith("sqlite:///"):
        where = _relative(url[len("sqlite:///") :], out)
        if not Path(where).is_absolute():
            return f"sqlite, {where} in this folder"
    return safe_url(url)


def _relative(path: str | None, out: Path) -> str | None:
    if not path:
        return None
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _epochs(trial: FrozenTrial) -> int | None:
    return trial.user_attrs.get("epochs") or (max(trial.intermediate_values) + 1 if trial.intermediate_values else None)


def trial_rows(study: optuna.Study, out: Path) -> list[dict[str, Any]]:
    """One row per trial of the study, in the order they were asked."""
    names = sorted({k for t in study.get_trials(deepcopy=False) for k in t.params})
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": STATE_NAMES[t.state],
                "value": t.value,
                **{k: t.params.get(k) for k in names},
                "epochs": _epochs(t),
                "seconds": t.user_attrs.get("seconds"),
                "run_dir": _relative(t.user_attrs.get("run_dir"), out),
                "error": (t.user_attrs.get("error") or "")[:200] or None,
            }
        )
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The trials as a markdown table (the metric's column named after it)."""
    if not rows:
        return "(no trials yet)\n"
    keys = list(rows[0])
    header = [metric if k == "value" else k for k in keys]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _set(config: dict[str, Any], dotted: str, value: Any, append: bool = False) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    if append:
        node.setdefault(leaf, [])
        node[leaf] += value if isinstance(value, list) else [value]
    else:
        node[leaf] = value


def best_recipe(spec: SweepSpec, fit_args: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """The base recipe with ``fit_args`` and ``params`` laid over it, as ``fit.py --config`` reads it."""
    from cifar_lightning.arguments import scan_args
    from cifar_lightning.fit import FIT_SWITCHES, expand_aliases

    config = yaml.safe_load(spec.recipe.read_text()) if spec.recipe else {}
    for arg in scan_args(expand_aliases(fit_args), FIT_SWITCHES):
        if arg.flag is None or arg.value is None:
            continue
        key = arg.flag[2:]
        append = key.endswith("+")
        key = key.rstrip("+")
        if any(key == m or key.startswith(m + ".") for m in MACHINE_KEYS):
            continue
        _set(config, key, yaml.safe_load(arg.value), append=append)
    for key, value in params.items():
        _set(config, key, value)
    return config


def save_plots(study: optuna.Study, out: Path) -> dict[str, str]:
    """Optuna's plots as PNG files; each one that cannot be drawn yet (too few trials) is skipped,
    with the reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    made: dict[str, str] = {}
    for name, fn in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" notes of Optuna's matplotlib plots
                ax = getattr(ovm, fn)(study)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.set_size_inches(9, 5.5)
            figure.savefig(out / name, dpi=110, bbox_inches="tight")
            plt.close(figure)
            made[name] = "ok"
        except Exception as err:  # e.g. importances with fewer than two finished trials
            made[name] = f"skipped: {type(err).__name__}: {err}"
    return made


def _best(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no trial is complete
        return None


def write_results(study: optuna.Study, spec: SweepSpec, out: Path, storage_url: str) -> dict[str, Any]:
    """Write the table, the best recipe, the plots and ``summary.json``; returns the summary."""
    rows = trial_rows(study, out)
    (out / "trials.md").write_text(
        f"# Study {study.study_name}: {len(rows)} trials\n\n" + markdown_table(rows, spec.metric)
    )
    with open(out / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["number"])
        writer.writeheader()
        writer.writerows(rows)
    best = _best(study)
    summary: dict[str, Any] = {
        "study": study.study_name,
        "storage": _storage_name(storage_url, out),
        "sweep_file": spec.path.name,
        "metric": spec.metric,
        "direction": spec.direction,
        "n_trials": spec.n_trials,
        "states": {STATE_NAMES[s]: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState},
        "sampler": spec.sampler,
        "pruner": spec.pruner,
        "fit_args": study.user_attrs.get("settings", {}).get("fit_args"),
    }
    if best is not None:
        fit_args = summary["fit_args"] or spec.fit_args
        recipe = best_recipe(spec, fit_args, best.params)
        header = (
            f"# best configuration of study {study.study_name}: trial {best.number}, {spec.metric} "
            f"{best.value:.4f} on the validation split\n# source: {spec.path.name} (a sweep), base recipe "
            f"{spec.recipe.name if spec.recipe else '(the defaults)'}\n# reference: none; its test is in "
            "summary.json\n"
        )
        (out / "best.yaml").write_text(header + yaml.safe_dump(recipe, sort_keys=False))
        summary["best"] = {
            "number": best.number,
            "value": best.value,
            "params": best.params,
            "run_dir": _relative(best.user_attrs.get("run_dir"), out),
            "checkpoint": _relative(best.user_attrs.get("checkpoint"), out),
        }
    summary["test"] = study.user_attrs.get("test")
    summary["plots"] = save_plots(study, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def test_best(study: optuna.Study, out: Path) -> dict[str, Any] | None:
    """Test the best trial's best checkpoint, once for the study (recorded in its attributes);
    returns the updated summary, or None when there was nothing (new) to test."""
    from cifar_lightning.evaluation import evaluate_main

    best = _best(study)
    if best is None or not best.user_attrs.get("checkpoint"):
        return None
    done = study.user_attrs.get("test")
    if done:
        if done.get("trial") != best.number:
            print(
                f"the study's test set was used once, by trial {done['trial']}; its new best, trial "
                f"{best.number}, is not tested (a second look would choose on the test set)"
            )
        return None
    ckpt = best.user_attrs["checkpoint"]
    if not Path(ckpt).is_file():
        print(
            f"the best trial's checkpoint {ckpt} is not on this machine: test it where it is, with "
            f"python scripts/evaluate.py {ckpt}"
        )
        return None
    study.set_user_attr("test", {"trial": best.number, "state": "running"})  # claimed before it runs
    report = evaluate_main([best.user_attrs["checkpoint"], "--output-dir", str(out / "best_test")])
    test = {
        "trial": best.number,
        "test_acc": report["test_acc"],
        "test_loss": report["test_loss"],
        "checkpoint": _relative(best.user_attrs["checkpoint"], out),
        "report": "best_test/report.json",
    }
    study.set_user_attr("test", test)
    summary = json.loads((out / "summary.json").read_text())
    summary["test"] = test
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"best trial {best.number} on the test set: {100 * test['test_acc']:.2f}% (once, for the study)")
    return summary
