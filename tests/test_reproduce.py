"""scripts/reproduce.py: runs recipes over seeds, keeps logs, tabulates without estimating."""

from __future__ import annotations

import json

from conftest import REPO

from benchmarks.reproduce import main, recipe_header


def test_every_recipe_header_parses():
    for recipe in sorted((REPO / "configs").glob("*.yaml")):
        head = recipe_header(recipe)
        assert {"source", "reference", "epochs", "time"} <= set(head), recipe.name


def test_runs_seeds_keeps_logs_and_writes_table(tiny_folder, tmp_path):
    recipe = tmp_path / "tiny_recipe.yaml"
    recipe.write_text(
        "# A tiny recipe for the test.\n# source: this test\n# reference: 50.00% (made up for the test)\n"
        "# reference_curve: 40.0 50.0 (made up)\n"
        "# epochs: 1\n# time: seconds\nmodel:\n  arch: simple_cnn\n  lr: 0.05\ntrainer:\n  max_epochs: 1\n"
    )
    results, table = tmp_path / "results", tmp_path / "table.md"
    smoke = tmp_path / "smoke.json"
    smoke.write_text(
        json.dumps(
            {
                "results": [
                    {
                        "recipe": "resnet20_paper",
                        "kind": "learns",
                        "steps": 60,
                        "late_loss": 1.86,
                        "val_acc": 0.2676,
                        "passed": True,
                    },
                    {
                        "recipe": "resnet34_tutorial",
                        "kind": "overfit",
                        "steps": 12,
                        "early_loss": 4.1,
                        "late_loss": 2.9,
                        "val_acc": 0.1,
                        "batch_steps": 40,
                        "batch_loss": 0.21,
                        "batch_acc": 0.95,
                        "passed": True,
                    },
                    {
                        "recipe": "resnet44_paper",
                        "kind": "learns",
                        "steps": 100,
                        "late_loss": 2.31,
                        "val_acc": 0.1,
                        "passed": False,
                    },
                ]
            }
        )
    )
    main(
        [
            str(recipe),
            "--seeds",
            "0",
            "1",
            "--data-dir",
            str(tiny_folder),
            "--results",
            str(results),
            "--table",
            str(table),
            "--configs",
            str(REPO / "configs"),
            "--smoke",
            str(smoke),
            "--extra",
            "--num-workers",
            "0",
            "--val-size",
            "6",
            "--batch-size",
            "8",
        ]
    )
    reports = [json.loads((results / f"tiny_recipe-seed{s}.json").read_text()) for s in (0, 1)]
    logs = [(results / f"tiny_recipe-seed{s}.log").read_text() for s in (0, 1)]
    assert "--seed 0" in logs[0] and "--seed 1" in logs[1]
    assert all(r["recipe"] == "tiny_recipe" and r["epochs"] == 1 for r in reports)
    assert not (results / "runs").exists()  # checkpoints are not kept
    assert (results / "tiny_recipe-seed0-metrics.csv").is_file()  # the per-epoch curves are
    assert (results / "tiny_recipe-curve.png").is_file()  # drawn beside the reference's curve
    rows = {line.split("|")[1].strip(): line for line in table.read_text().splitlines() if line.startswith("| ")}
    mean = sum(100 * r["test_acc"] for r in reports) / 2
    assert f"{mean:.2f}%" in rows["tiny_recipe"] and "(2)" in rows["tiny_recipe"]
    assert "measured, 2 seed(s)" in rows["tiny_recipe"] and "--num-workers 0" in rows["tiny_recipe"]
    # every row says how it stands: a smoke check is not a measurement, and nothing is estimated
    assert (
        "smoke-checked only: 60 steps" in rows["resnet20_paper"] and rows["resnet20_paper"].split("|")[4].strip() == "-"
    )
    # a one-batch check says what it showed, and does not claim the data loss fell below chance
    assert (
        "smoke-checked only (one batch learnt, data run falls): 40 steps on one batch to loss 0.21"
        in rows["resnet34_tutorial"]
    )
    assert "12 data steps, loss 4.10 to 2.90" in rows["resnet34_tutorial"]
    # a failed smoke check is not shown as a pass
    assert "smoke check FAILED" in rows["resnet44_paper"]
    assert "| not run |" in rows["resnet110_paper"] and rows["resnet110_paper"].split("|")[4].strip() == "-"


def test_keep_checkpoints_keeps_the_tested_checkpoint_only(tiny_folder, tmp_path):
    from cifar_lightning.checkpoint import load_classifier

    recipe = tmp_path / "tiny_recipe.yaml"
    recipe.write_text(
        "# source: this test\n# reference: none\n# epochs: 1\n# time: seconds\n"
        "model:\n  arch: simple_cnn\ntrainer:\n  max_epochs: 1\n"
    )
    results = tmp_path / "results"
    # another invocation's run, still going: its folder must survive this one's clean-up
    other = results / "runs" / "other-seed0"
    other.mkdir(parents=True)
    main(
        [
            str(recipe),
            "--seeds",
            "3",
            "--data-dir",
            str(tiny_folder),
            "--results",
            str(results),
            "--table",
            str(tmp_path / "table.md"),
            "--keep-checkpoints",
            "--extra",
            "--num-workers",
            "0",
            "--val-size",
            "6",
            "--batch-size",
            "8",
        ]
    )
    report = json.loads((results / "tiny_recipe-seed3.json").read_text())
    kept = results / "tiny_recipe-seed3.ckpt"
    assert load_classifier(kept).hparams.arch == "simple_cnn"
    assert report["checkpoint"].endswith(".ckpt")
    assert not (results / "runs" / "tiny_recipe-seed3").exists() and other.is_dir()
