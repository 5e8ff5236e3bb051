"""LightningCLI and the recipes in configs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from cifar_lightning.cli import cli_main
from cifar_lightning.fit import fit_main

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def tiny_overrides(data_dir: Path, out: Path) -> list[str]:
    return [
        f"--data.data_dir={data_dir}",
        "--data.download=false",
        "--data.num_workers=0",
        "--data.batch_size=4",
        "--data.val_size=6",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        *QUIET,
    ]


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    expected = {
        "mynet_tutorial",
        "resnet34_tutorial",
        "simple_cnn_tutorial",
        "dainet7_tutorial",
        "resnet50_tutorial",
        "resnet18",
        *(f"resnet{d}_paper" for d in (20, 32, 44, 56, 110)),
    }
    assert expected <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_has_a_header_and_runs(config, tiny_folder, tmp_path, monkeypatch):
    header = [line for line in config.read_text().splitlines() if line.startswith("#")]
    for field in ("source:", "reference:", "epochs:", "time:"):
        assert any(field in line for line in header), f"{config.name} header lacks '{field}'"
    data = tiny_folder
    if (yaml.safe_load(config.read_text()).get("data") or {}).get("dataset") == "cifar100":
        from test_datasets import write_cifar100
        from torchvision.datasets import CIFAR100, cifar

        monkeypatch.setattr(CIFAR100, "_check_integrity", lambda self: True)  # small stand-in files
        monkeypatch.setattr(cifar, "check_integrity", lambda *a: True)
        data = write_cifar100(tmp_path / "cifar100", n_train=1, n_test=1)
    cli = cli_main(["fit", "--config", str(config), *tiny_overrides(data, tmp_path), "--trainer.fast_dev_run=true"])
    # the model and data the recipe describes are the ones that ran
    recipe = yaml.safe_load(config.read_text())
    for key, value in recipe["model"].items():
        got = cli.model.hparams[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    overridden = {"data_dir", "download", "num_workers", "batch_size", "val_size"}
    for key, value in recipe.get("data", {}).items():
        if key not in overridden:
            assert cli.datamodule.hparams[key] == value, key


def print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", *args, "--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_round_trip(tmp_path, capsys):
    first = print_config(["--config", str(REPO / "configs" / "resnet110_paper.yaml"), "--model.lr=0.05"], capsys)
    assert first["model"]["arch"] == "resnet110" and first["model"]["lr"] == 0.05
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(first))
    assert print_config(["--config", str(dumped)], capsys) == first


def test_configs_compose_and_flags_override(capsys):
    cfg = print_config(["--config", str(REPO / "configs" / "resnet18.yaml"), "--trainer.max_epochs=5"], capsys)
    assert cfg["trainer"]["max_epochs"] == 5 and cfg["model"]["nesterov"] is True


def _hparams(ckpt: str) -> tuple[dict, dict]:
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    return state["hyper_parameters"], state["datamodule_hyper_parameters"]


def test_alias_flags_and_yaml_give_the_same_checkpoint_hparams(tiny_folder, tmp_path):
    common = [
        "--output-dir",
        str(tmp_path),
        "--data-dir",
        str(tiny_folder),
        "--num-workers",
        "0",
        "--val-size",
        "6",
        "--trainer.limit_train_batches=2",
        *QUIET,
    ]
    by_flags = fit_main(
        [
            "--arch",
            "simple_cnn",
            "--optimizer",
            "adam",
            "--lr",
            "0.003",
            "--weight-decay",
            "0.001",
            "--scheduler",
            "onecycle",
            "--batch-size",
            "8",
            "--augment",
            "none",
            "--epochs",
            "1",
            "--label-smoothing",
            "0.1",
            "--name",
            "flags",
            *common,
        ]
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "arch": "simple_cnn",
                    "optimizer": "adam",
                    "lr": 0.003,
                    "weight_decay": 0.001,
                    "scheduler": "onecycle",
                    "label_smoothing": 0.1,
                },
                "data": {"batch_size": 8, "augment": "none"},
                "trainer": {"max_epochs": 1},
            }
        )
    )
    by_yaml = fit_main(["--config", str(recipe), "--name", "yaml", *common])
    assert _hparams(by_flags["checkpoint"]) == _hparams(by_yaml["checkpoint"])
    assert _hparams(by_flags["checkpoint"])[0]["optimizer"] == "adam"
    assert Path(by_flags["checkpoint"]).parts[-4] == "flags"


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("model:\n  arch: simple_cnn\n  lrr: 0.1\n", r"bad\.yaml: unknown key model\.lrr\. Did you mean model\.lr\?"),
        (
            "model:\n  weight_decey: 0.1\n",
            r"bad\.yaml: unknown key model\.weight_decey\. Did you mean model\.weight_decay\?",
        ),
        ("model:\n  lr: fast\n", r"bad\.yaml: model\.lr: expected a float, got 'fast'"),
        ("data:\n  augment: sideways\n", r"bad\.yaml: data\.augment: expected one of none, standard, .*got 'sideways'"),
        ("model:\n  arch: [unclosed\n", r"bad\.yaml: not valid YAML"),
    ],
    ids=["unknown-key", "near-key", "wrong-type", "bad-choice", "invalid-yaml"],
)
def test_bad_config_is_one_line_naming_the_file_and_key(tmp_path, capsys, content, pattern):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # the error first and alone: no usage text above it (that comes with --help)
    assert err.count("\n") == 1 and err.startswith("error: ") and "usage:" not in err, err
    assert re.search(pattern, err), err
    assert "python -m cifar_lightning fit --help" in err


def test_bad_flags_are_named_as_typed(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.weight_decey", "0.1"])
    assert "unknown option --model.weight_decey. Did you mean --model.weight_decay?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fit_main(["--weight-decay", "x"])
    err = capsys.readouterr().err
    assert err.startswith("error: --weight-decay: expected a float, got 'x'.") and "scripts/fit.py --help" in err
    with pytest.raises(SystemExit):
        fit_main(["--model.weight_decey", "0.1"])
    assert "Did you mean --weight-decay?" in capsys.readouterr().err


def test_cli_messages_name_cli_arguments(tmp_path, capsys):
    # the package's messages name fit.py's flags; through the CLI they name the CLI's own
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--data.data_dir={tmp_path / 'nothing'}", "--data.download=false"])
    err = capsys.readouterr().err
    assert "--data.data_dir" in err and "--data-dir" not in err, err


def test_test_subcommand_rebuilds_from_checkpoint(tiny_folder, tmp_path):
    report = fit_main(
        [
            "--arch",
            "lenet5",
            "--epochs",
            "1",
            "--output-dir",
            str(tmp_path),
            "--data-dir",
            str(tiny_folder),
            "--num-workers",
            "0",
            "--val-size",
            "6",
            "--batch-size",
            "8",
            *QUIET,
        ]
    )
    cli = cli_main(["test", f"--ckpt_path={report['checkpoint']}", *tiny_overrides(tiny_folder, tmp_path / "t")])
    # the architecture comes from the checkpoint, not from the CLI default (resnet18)
    assert cli.model.hparams.arch == "lenet5"
    assert cli.trainer.callback_metrics["test/acc"].item() == pytest.approx(report["test_acc"])


def nonstandard_checkpoint(tiny_folder, tmp_path) -> str:
    """A checkpoint trained with a normalisation other than the data module's default."""
    report = fit_main(
        [
            "--arch",
            "simple_cnn",
            "--epochs",
            "2",
            "--output-dir",
            str(tmp_path / "fit"),
            "--data-dir",
            str(tiny_folder),
            "--num-workers",
            "0",
            "--val-size",
            "6",
            "--batch-size",
            "4",
            "--lr",
            "0.05",
            "--data.mean",
            "[0.5,0.5,0.5]",
            "--data.std",
            "[0.5,0.5,0.5]",
            *QUIET,
        ]
    )
    return report["checkpoint"]


def test_test_subcommand_reads_the_data_as_the_checkpoint_did(tiny_folder, tmp_path):
    from cifar_lightning.evaluation import evaluate_main

    ckpt = nonstandard_checkpoint(tiny_folder, tmp_path)
    # no data arguments at all: the folder, normalisation and classes come from the checkpoint
    cli = cli_main(
        [
            "test",
            f"--ckpt_path={ckpt}",
            "--data.num_workers=0",
            "--data.batch_size=5",
            f"--trainer.default_root_dir={tmp_path / 't'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 't'}",
            *QUIET,
        ]
    )
    assert list(cli.datamodule.norm_mean) == [0.5] * 3 and list(cli.datamodule.norm_std) == [0.5] * 3
    got = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    report = evaluate_main([ckpt, "--output-dir", str(tmp_path / "eval")])
    assert got["test/loss"] == pytest.approx(report["test_loss"], rel=1e-4)
    for name in cli.datamodule.class_names:
        assert got[f"test/acc/{name}"] == pytest.approx(report["per_class"][name]["accuracy"], abs=1e-6)


def test_data_that_contradicts_the_checkpoint_is_refused(tiny_folder, tmp_path, capsys):
    from conftest import write_image_folder

    ckpt = nonstandard_checkpoint(tiny_folder, tmp_path)
    other = write_image_folder(tmp_path / "other", classes=("apple", "pear", "plum"), n_train=2, n_test=2)
    for args, said in (
        (
            ["--data.mean=[0.4,0.4,0.4]", "--data.std=[0.2,0.2,0.2]"],
            "trained on images normalised with mean [0.5, 0.5, 0.5]",
        ),
        ([f"--data.data_dir={other}"], "was trained on 3 classes"),
        (["--data.image_size=64"], "trained on 32 px images"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli_main(["validate", f"--ckpt_path={ckpt}", "--data.num_workers=0", *args, *QUIET])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and said in err and err.count("\n") == 1, err


def test_cli_names_runs_as_fit_py_does_and_prints_where_they_are(tiny_folder, tmp_path, capsys):
    args = [
        "fit",
        f"--data.data_dir={tiny_folder}",
        "--data.num_workers=0",
        "--data.batch_size=8",
        "--data.val_size=6",
        "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        *QUIET,
    ]
    cli = cli_main([*args, "--model.arch=simple_cnn"])
    assert Path(cli.trainer.log_dir) == tmp_path / "simple_cnn" / "version_0"
    out = capsys.readouterr().out
    assert f"run: {tmp_path / 'simple_cnn' / 'version_0'}" in out
    assert re.search(
        rf"checkpoint: {re.escape(str(tmp_path / 'simple_cnn' / 'version_0' / 'checkpoints'))}/best-\S+\.ckpt", out
    )
    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text("model:\n  arch: simple_cnn\n")
    cli = cli_main([*args, "--config", str(recipe)])
    assert Path(cli.trainer.log_dir) == tmp_path / "my_recipe" / "version_0"  # as fit.py names a recipe's runs


def test_print_config_shows_the_precision_that_will_be_used(capsys, monkeypatch):
    from cifar_lightning import trainer

    for flags, expected in ((frozenset({"avx2", "avx512_bf16"}), "bf16-mixed"), (frozenset({"avx2"}), "32-true")):
        monkeypatch.setattr(trainer, "cpu_flags", lambda flags=flags: flags)
        cfg = print_config(["--trainer.accelerator=cpu"], capsys)
        assert cfg["trainer"]["precision"] == expected
        # an explicit precision is kept as given
        assert (
            print_config(["--trainer.accelerator=cpu", "--trainer.precision=16-mixed"], capsys)["trainer"]["precision"]
            == "16-mixed"
        )
