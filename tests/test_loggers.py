"""Loggers: each writes what a dashboard needs, read back with the logger's own reader."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from wandb_records import summarize

from cifar_lightning.cli import CifarCLI
from cifar_lightning.fit import expand_aliases, fit_main

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def fit_with(tiny_folder: Path, out: Path, *extra: str) -> dict:
    return fit_main(
        [
            "--arch",
            "simple_cnn",
            "--epochs",
            "2",
            "--lr",
            "0.05",
            "--data-dir",
            str(tiny_folder),
            "--output-dir",
            str(out),
            "--num-workers",
            "0",
            "--batch-size",
            "8",
            "--val-size",
            "6",
            *QUIET,
            *extra,
        ]
    )


def test_csv_has_per_class_columns(tiny_folder, tmp_path):
    fit_with(tiny_folder, tmp_path)
    with open(tmp_path / "simple_cnn" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for name in ("cat", "dog", "frog"):
        assert {f"val/acc/{name}", f"test/acc/{name}"} <= columns
    assert sum(1 for r in rows if r["val/acc"]) == 2  # one validation row per epoch
    assert sum(1 for r in rows if r["test/acc"]) == 1


def test_tensorboard_scalars_images_hparams_and_graph(tiny_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit_with(tiny_folder, tmp_path, "--logger", "tensorboard", "--log-graph")
    tb_dir = tmp_path / "simple_cnn" / "version_0" / "tensorboard"
    assert (tmp_path / "simple_cnn" / "version_0" / "metrics.csv").is_file()  # same version folder
    tags: dict[str, set] = {"scalars": set(), "images": set(), "hparams": set(), "graph": set()}
    for events in tb_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        t = acc.Tags()
        tags["scalars"] |= set(t["scalars"])
        tags["images"] |= set(t["images"])
        try:
            tags["hparams"] |= set(acc.PluginTagToContent("hparams"))
        except KeyError:  # this event file holds no hparams summary
            pass
        if t["graph"]:
            tags["graph"].add("graph")
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc/cat", "test/acc", "test/acc/frog", "lr-SGD"):
        assert key in tags["scalars"], key
    assert {"test/predictions", "test/confusion_matrix"} <= tags["images"]
    assert "_hparams_/session_start_info" in tags["hparams"]
    assert tags["graph"] == {"graph"}


def _offline_run(out: Path) -> Path:
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    return runs[0]


def test_wandb_offline_run_holds_config_metrics_table_and_matrix(tiny_folder, tmp_path, capfd):
    fit_with(tiny_folder, tmp_path, "--logger", "wandb", "--group", "seeds", "--tags", "a,b")
    # Lightning passes anonymous=None, which W&B warns about on every run unless it is left out
    assert "anonymous setting has no effect" not in "".join(capfd.readouterr())
    run_file = _offline_run(tmp_path)
    run = summarize(run_file)
    # the full resolved CLI config and the module/data hyperparameters
    assert run["config"]["cli"]["model"]["arch"] == "simple_cnn"
    assert run["config"]["cli"]["trainer"]["max_epochs"] == 2
    assert run["config"]["class_names"] == ["cat", "dog", "frog"]
    keys = run["history_keys"]
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "lr-SGD", "test/acc", "test/acc/dog"):
        assert key in keys, key
    assert any(k.startswith("test/predictions") for k in keys)
    assert any(k.startswith("test/confusion_matrix") for k in keys)
    assert not any(k.startswith(("gradients/", "parameters/")) for k in keys)  # only with --watch
    # the predictions table: one row per test image (12), with the top-3 columns
    table_files = list(run_file.parent.glob("files/media/table/test/predictions_*.table.json"))
    assert len(table_files) == 1
    table = json.loads(table_files[0].read_text())
    assert table["columns"][:4] == ["image", "truth", "prediction", "correct"] and "p3" in table["columns"]
    assert len(table["data"]) == 12
    assert {row[1] for row in table["data"]} == {"cat", "dog", "frog"}


def test_wandb_without_key_or_mode_goes_offline(tiny_folder, tmp_path, monkeypatch, caplog):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    report = fit_with(tiny_folder, tmp_path, "--logger", "wandb")
    assert report["test_acc"] >= 0
    assert _offline_run(tmp_path).is_file()
    lines = [r.getMessage() for r in caplog.records if "W&B:" in r.getMessage()]
    assert len(lines) == 1 and "no W&B API key" in lines[0]
    assert f"Sync later with: wandb sync {tmp_path}/wandb/offline-run-*" in lines[0]


def test_unknown_logger_is_a_user_error(tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        fit_with(tiny_folder, tmp_path, "--logger", "mlflow")
    assert exc.value.code == 2
    assert "unknown logger 'mlflow'. Valid names: csv, tensorboard, wandb" in capsys.readouterr().err


def test_logger_list_through_the_cli_config(tiny_folder, tmp_path):
    config = tmp_path / "loggers.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "logger": [
                        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
                        {
                            "class_path": "cifar_lightning.loggers.WandbLogger",
                            "init_args": {
                                "save_dir": str(tmp_path),
                                "project": "p",
                                "watch": "all",
                                "watch_log_freq": 1,
                            },
                        },
                    ]
                }
            }
        )
    )
    fit_main(
        [
            "--config",
            str(config),
            "--arch",
            "simple_cnn",
            "--epochs",
            "1",
            "--data-dir",
            str(tiny_folder),
            "--num-workers",
            "0",
            "--batch-size",
            "8",
            "--val-size",
            "6",
            *QUIET,
        ]
    )
    keys = summarize(_offline_run(tmp_path))["history_keys"]
    assert any(k.startswith("gradients/") for k in keys) and any(k.startswith("parameters/") for k in keys)


def test_sweep_files_map_onto_valid_fit_arguments(tiny_folder):
    sweeps = sorted((REPO / "configs" / "wandb_sweeps").glob("*.yaml"))  # W&B's (Optuna's: test_sweep.py)
    assert sweeps
    for path in sweeps:
        sweep = yaml.safe_load(path.read_text())
        assert (REPO / sweep["program"]).is_file()
        assert sweep["metric"]["name"].startswith("val/")  # tuning never looks at the test set
        fixed = [a for a in sweep["command"] if a.startswith("--")]
        sampled = [
            f"--{name}={spec.get('min', spec.get('values', [None])[0])}" for name, spec in sweep["parameters"].items()
        ]
        args = expand_aliases(fixed + sampled + ["--data-dir", str(tiny_folder), "--no-download"])
        cli = CifarCLI(args=args, run=False)
        for name, spec in sweep["parameters"].items():
            target = {"lr": cli.model.hparams.lr, "weight-decay": cli.model.hparams.weight_decay}[name]
            assert target == pytest.approx(spec["min"])
