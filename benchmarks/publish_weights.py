"""Publish trained weights: the network of a recipe's median seed, named by its sha256, with its
evidence in the manifest.

From the runs that ``scripts/reproduce.py RECIPE --seeds ... --keep-checkpoints`` kept (a report
and the tested checkpoint of each seed, in ``benchmarks/reproduce/``), ``publish`` ships one network
per recipe into ``cifar_lightning/weights/``:

1. the seed: the median of the seeds by test accuracy (``SELECTION_RULE``), so that the file is
   typical of its recipe, not the luckiest of n draws (each run kept its last epoch, chosen by
   nothing);
2. its network is written as a float32 file, loaded afresh as a user loads it, and evaluated on the
   test set, plain and with the recipe's TTA; the accuracy must agree with its run's report (it is
   the model that run tested);
3. the same in float16, which is shipped where it changes no test prediction (plain and TTA, on
   every test image), as ``<arch>-<sha256 prefix>.pt``; the figures recorded are those of the
   shipped file, with its accuracy under corruptions (``--corruptions``);
4. the manifest entry gathers it all, with the provenance of the runs and of this command; files of
   the arch that it supersedes are removed, and the model card is written again.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks import REPO
from benchmarks.reproduce import fit_seconds, recipe_header, resolve_recipe, run_parts
from cifar_lightning.errors import UserError, exit_on_user_error, positive
from cifar_lightning.models.pretrained import (
    MANIFEST,
    MANIFEST_FORMAT,
    PACKAGE_WEIGHTS,
    read_manifest,
    weights_dir,
    write_weights,
)
from cifar_lightning.report import write_report

#: How the shipped seed is chosen among a recipe's runs.
SELECTION_RULE = (
    "the median seed by test accuracy: the seeds sorted by (test accuracy, seed), the middle one (for an even "
    "count the lower of the two middle ones); typical of the recipe, not the best of n runs"
)
#: How the storage dtype is chosen.
STORAGE_RULE = (
    "float16 where the float16 weights change no prediction on the test set (plain and with the recipe's TTA) "
    "and leave every weight finite; float32 otherwise"
)
#: Batch size of every evaluation here (the figures are reproduced at this batch size).
EVAL_BATCH = 500
#: Largest gap between a checkpoint's accuracy here and its run's report (the run may have tested
#: under another precision, e.g. bf16 autocast, which moves a few near-ties).
REPORT_TOLERANCE = 0.005
#: What the weights take, in the words of the manifest.
INPUT = (
    "RGB in [0, 1], (B, 3, 32, 32) float32, as torchvision.transforms.ToTensor() gives it; the model normalises "
    "inside (normalize=False: the bare network, which takes (x - mean) / std)"
)


def kept_runs(recipe: str, results: Path, seeds: Sequence[int] | None = None) -> dict[int, dict[str, Any]]:
    """The reports of ``recipe``'s kept runs by seed (all of them, or ``seeds``)."""
    pattern = re.compile(rf"{re.escape(recipe)}-seed(\d+)\.json")
    reports = {
        int(m.group(1)): json.loads(p.read_text())
        for p in sorted(results.glob(f"{recipe}-seed*.json"))
        if (m := pattern.fullmatch(p.name))
    }
    hint = f"Run python scripts/reproduce.py {recipe} --seeds 0 1 2 --keep-checkpoints first."
    if seeds:
        missing = [s for s in seeds if s not in reports]
        if missing:
            raise UserError(f"no kept run of {recipe} with seed {missing[0]} in {results}. {hint}")
        reports = {s: reports[s] for s in seeds}
    if not reports:
        raise UserError(f"no kept runs of {recipe} in {results} (no {recipe}-seed<N>.json). {hint}")
    return reports


def median_seed(accuracy: dict[int, float]) -> int:
    """The seed ``SELECTION_RULE`` ships."""
    order = sorted(accuracy, key=lambda s: (accuracy[s], s))
    return order[(len(order) - 1) // 2]


def _changed(a, b) -> dict[str, int]:
    """Test images whose prediction differs between two evaluations, plain and with TTA."""
    out = {"plain": int((a.preds != b.preds).sum())}
    if a.tta_logits is not None:
        out["tta"] = int((a.tta_logits.argmax(1) != b.tta_logits.argmax(1)).sum())
    return out


def _figures(evaluation) -> dict[str, Any]:
    metrics = evaluation.metrics()
    return {"test_acc": metrics["test_acc"], "test_acc_tta": (metrics.get("tta") or {}).get("test_acc")}


def _stats(values: list[float]) -> dict[str, Any]:
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.mean(values), "std": std, "n": len(values)}


def _training(
    reports: dict[int, dict[str, Any]], seed: int, ckpt: dict[str, Any], results: Path, recipe: str
) -> dict[str, Any]:
    """Time, machine and data of the shipped seed's run (and the mean time over the seeds)."""
    report = reports[seed]
    prov = report.get("provenance") or {}
    machine = prov.get("machine") or {}
    parts = {s: run_parts(results, recipe, s) for s in reports}
    return {
        "fit_seconds": fit_seconds(report, parts[seed]),
        "fit_seconds_mean": statistics.mean(fit_seconds(r, parts[s]) for s, r in reports.items()),
        "parts": parts[seed],
        "epochs": report.get("epochs"),
        "global_step": report.get("global_step"),
        "train_images": report.get("train_images"),
        "val_size": (ckpt.get("datamodule_hyper_parameters") or {}).get("val_size", 0.1),
        "machine": {k: machine.get(k) for k in ("cpu", "cpu_cores", "gpu", "torch_threads")}
        if machine
        else {"hardware": report.get("hardware")},
        "machine_busy": prov.get("machine_busy"),
        "date": report.get("date"),
        "note": report.get("note"),
        "command": prov.get("command"),
        "started": prov.get("started"),
        "finished": prov.get("finished"),
        "versions": prov.get("versions"),
    }


def _check_data(reports: dict[int, dict[str, Any]], data: dict[str, Any] | None) -> None:
    """``UserError`` when a run trained on another copy of the data than the one evaluated here."""
    for seed, report in reports.items():
        theirs = ((report.get("provenance") or {}).get("data") or {}).get("sha256")
        if theirs and data and data.get("sha256") and theirs != data["sha256"]:
            raise UserError(
                f"seed {seed} of {report.get('recipe')} trained on a data copy with sha256 {theirs[:12]}..., and "
                f"--data-dir is {data['name']} ({data['sha256'][:12]}...). Evaluate on the copy the runs used."
            )


def publish(
    recipe: str,
    *,
    data_dir: str,
    results: Path,
    weights: Path,
    configs: Path = REPO / "configs",
    seeds: Sequence[int] | None = None,
    corruption_images: int = 1000,
) -> dict[str, Any]:
    """Ship the median seed of ``recipe`` into ``weights`` (see the module's docstring); returns
    its manifest entry."""
    from benchmarks.provenance import describe_data, describe_path, finish, provenance, scrub
    from cifar_lightning.checkpoint import build_classifier, check_compatible, read_checkpoint, stored_dataset
    from cifar_lightning.data import CIFAR10DataModule

    prov = provenance(data_dir)
    recipe_path = resolve_recipe(Path(recipe), configs)
    name = recipe_path.stem
    reports = kept_runs(name, results, seeds)
    accuracy = {s: float(r["test_acc"]) for s, r in reports.items()}
    seed = median_seed(accuracy)
    ckpt_path = results / f"{name}-seed{seed}.ckpt"
    if not ckpt_path.is_file():
        raise UserError(
            f"{name}: the shipped seed is {seed} ({SELECTION_RULE}), and its checkpoint {ckpt_path} is not there. Run "
            f"python scripts/reproduce.py {name} --seeds {seed} --keep-checkpoints to make it."
        )
    data = describe_data(data_dir)
    _check_data(reports, data)
    ckpt = read_checkpoint(ckpt_path)
    module = build_classifier(ckpt, ckpt_path)
    hp = module.hparams
    arch, tta = hp.arch, hp.get("tta", "none")
    dm = CIFAR10DataModule(data_dir=data_dir, download=False, num_workers=0, **stored_dataset(ckpt))
    check_compatible(module, class_names=dm.class_names, checkpoint=ckpt_path, against=f"the data in {data_dir}")
    images, labels = dm.split_arrays("test")
    print(f"{name}: seed {seed} of {sorted(reports)} ({arch}), on {len(labels):,} test images")
    entry, state = _describe(module), module.model.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        # Each candidate file is staged aside and loaded as a user loads it: the figures are the file's.
        fields, fresh, shipped = _staged(state, arch, "float32", entry, Path(tmp), images, labels)
        tested = _figures(shipped)["test_acc_tta" if tta != "none" else "test_acc"]
        if abs(tested - accuracy[seed]) > REPORT_TOLERANCE:
            raise UserError(
                f"{ckpt_path} gives {100 * tested:.2f}% on {data_dir}, and its run reported "
                f"{100 * accuracy[seed]:.2f}%: it is not the model that run tested, or the data is another copy. "
                "Run that seed again with --keep-checkpoints."
            )
        checks: dict[str, Any] = {"float16": "weights beyond float16's range"}
        if _fits_float16(state):
            half = _staged(state, arch, "float16", entry, Path(tmp), images, labels)
            checks["float16"] = _changed(shipped, half[2])
            if not any(checks["float16"].values()):
                fields, fresh, shipped = half
    print(f"  float16 changes {checks['float16']} test predictions: {fields['dtype']}, {fields['bytes']:,} bytes")
    # The same tensors give the same bytes: the file evaluated above, under the same name.
    assert write_weights(state, arch, weights, fields["dtype"]) == fields

    corruptions = None
    if corruption_images:
        from cifar_lightning.corruptions import corruption_report
        from cifar_lightning.data.archives import default_cache_dir
        from cifar_lightning.evaluation import fair_subset

        sub_images, sub_labels = fair_subset(images, np.asarray(labels), corruption_images)
        full = corruption_report(
            fresh, sub_images, sub_labels, cache_dir=default_cache_dir() / "corruptions", batch_size=EVAL_BATCH
        )
        keep = (
            "images",
            "seed",
            "severities",
            "clean_accuracy",
            "mean_accuracy",
            "mean_by_severity",
            "mean_by_corruption",
            "relative_drop",
        )
        corruptions = {k: full[k] for k in keep}

    runs = {s: (r.get("provenance") or {}) for s, r in reports.items()}
    commits = sorted({p.get("commit") for p in runs.values() if p.get("commit")})
    entry = {
        "arch": arch,
        **fields,
        "url": None,
        **entry,
        "recipe": name,
        "recipe_file": describe_path(recipe_path),
        "target": recipe_header(recipe_path).get("expected"),
        "commit": commits[0] if len(commits) == 1 else commits or None,
        "uncommitted_changes": any(p.get("uncommitted_changes") for p in runs.values()),
        "data": {**(data or {}), "label": reports[seed].get("data")},
        "seeds": sorted(reports),
        "test_acc": {
            **_stats(list(accuracy.values())),
            "per_seed": {str(s): accuracy[s] for s in sorted(accuracy)},
            "measure": "trainer.test at the end of each run, "
            + (f"with the recipe's TTA ({tta})" if tta != "none" else "plain forward"),
        },
        "selection_rule": SELECTION_RULE,
        "shipped_seed": seed,
        "shipped": {
            "seed": seed,
            "checkpoint": describe_path(ckpt_path),
            **_figures(shipped),
            "tta": tta,
            "run_test_acc": accuracy[seed],
            "test_images": len(labels),
            "batch_size": EVAL_BATCH,
            "measure": "the weight file loaded afresh, as create_model(pretrained=True) and scripts/evaluate.py do",
        },
        "storage": {"rule": STORAGE_RULE, "changed_predictions": checks, "test_images": len(labels)},
        "corruptions": corruptions,
        "training": _training(reports, seed, ckpt, results, name),
        "provenance": finish(prov),
    }
    entry = scrub(entry)
    _write_entry(Path(weights), entry)
    return entry


def _staged(state, arch: str, dtype: str, entry: dict[str, Any], tmp: Path, images, labels) -> tuple:
    """(manifest fields, module, evaluation) of ``state`` written as a ``dtype`` weight file in a
    folder of its own, then loaded and evaluated as ``scripts/evaluate.py NAME`` does."""
    from cifar_lightning.checkpoint import build_classifier, pretrained_checkpoint
    from cifar_lightning.evaluation import evaluate

    folder = tmp / dtype
    fields = write_weights(state, arch, folder, dtype)
    write_report({"format": MANIFEST_FORMAT, "weights": {arch: entry | fields}}, folder / MANIFEST)
    module = build_classifier(pretrained_checkpoint(arch, folder), arch)
    return fields, module, evaluate(module, images, labels, batch_size=EVAL_BATCH, tta=entry["tta"])


def _describe(module) -> dict[str, Any]:
    """What a loader needs to rebuild and feed the network: the manifest fields of the checkpoint."""
    hp = module.hparams
    return {
        "arch_kwargs": dict(hp.arch_kwargs or {}),
        "num_classes": int(hp.num_classes),
        "class_names": list(module.class_names),
        "mean": list(hp.norm_mean),
        "std": list(hp.norm_std),
        "image_size": int(hp.get("image_size", 32)),
        "tta": hp.get("tta", "none"),
        "input": INPUT,
    }


def _fits_float16(state: dict[str, Any]) -> bool:
    import torch

    return all(torch.isfinite(v.half()).all() for v in state.values() if v.is_floating_point())


def _write_entry(folder: Path, entry: dict[str, Any]) -> None:
    """Put ``entry`` into the manifest of ``folder``, then remove the files of its arch it supersedes."""
    from cifar_lightning.models.pretrained import read_weights

    manifest = read_manifest(folder)
    manifest["weights"] = dict(sorted({**manifest["weights"], entry["arch"]: entry}.items()))
    write_report(manifest, folder / MANIFEST)
    read_weights(entry["arch"], folder)  # the published file, checked as every load checks it
    own = re.compile(rf"{re.escape(entry['arch'])}-[0-9a-f]+\.pt")
    for old in sorted(folder.glob(f"{entry['arch']}-*.pt")):
        if own.fullmatch(old.name) and old.name != entry["file"]:
            old.unlink()
            print(f"  removed {old.name} (superseded)")


def summary(entry: dict[str, Any]) -> str:
    """One line of what was published."""
    acc, shipped = entry["test_acc"], entry["shipped"]
    spread = f" ± {100 * acc['std']:.2f}" if acc["std"] is not None else ""
    tta = "" if shipped["test_acc_tta"] is None else f", {100 * shipped['test_acc_tta']:.2f}% with TTA ({entry['tta']})"
    return (
        f"{entry['arch']}: {entry['file']} ({entry['dtype']}, {entry['bytes']:,} bytes) from {entry['recipe']} seed "
        f"{entry['shipped_seed']}: {100 * shipped['test_acc']:.2f}% plain{tta}; the recipe: {100 * acc['mean']:.2f}%"
        f"{spread} (n = {acc['n']})"
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``scripts/publish_weights.py``: publish each recipe's weights, then write the model card."""
    p = argparse.ArgumentParser(description="Ship the median seed of each recipe's kept runs as trained weights.")
    p.add_argument("recipes", nargs="+", help="recipe names in --configs (resnet20_short) or recipe files")
    p.add_argument("--data-dir", required=True, help="the data copy the runs trained on; its test set is evaluated")
    p.add_argument(
        "--results",
        type=Path,
        default=REPO / "benchmarks" / "reproduce",
        help="kept runs of scripts/reproduce.py (default: benchmarks/reproduce)",
    )
    p.add_argument("--weights-dir", type=Path, help="where the weights go (default: cifar_lightning/weights)")
    p.add_argument("--configs", type=Path, default=REPO / "configs", help="the recipes folder (default: this clone's)")
    p.add_argument("--seeds", type=int, nargs="+", help="the runs to use (default: every kept run of the recipe)")
    p.add_argument(
        "--corruptions",
        type=int,
        default=1000,
        metavar="N",
        help="test images measured under 15 corruptions x 5 severities (default 1000; 0: none)",
    )
    p.add_argument("--card", type=Path, help="model card to write (default: docs/models.md for the package's weights)")
    p.add_argument("--threads", type=positive(int), help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    weights = args.weights_dir or weights_dir()
    card = args.card or (REPO / "docs" / "models.md" if weights.resolve() == PACKAGE_WEIGHTS else None)
    entries = []
    for recipe in args.recipes:
        entries.append(
            publish(
                recipe,
                data_dir=args.data_dir,
                results=args.results,
                weights=weights,
                configs=args.configs,
                seeds=args.seeds,
                corruption_images=args.corruptions,
            )
        )
        print(summary(entries[-1]))
    if card is not None:
        from cifar_lightning.models.card import model_card_markdown, model_card_rows

        card.parent.mkdir(parents=True, exist_ok=True)
        card.write_text(model_card_markdown(model_card_rows(), read_manifest(weights)))
        print(f"model card: {card}")
    return entries
