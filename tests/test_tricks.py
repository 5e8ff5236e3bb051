"""Training tricks: an exponential moving average of the weights (``--ema``)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch.optim.swa_utils import get_ema_avg_fn

from cifar_lightning.callbacks import EMA
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.evaluation import evaluate_main
from cifar_lightning.fit import fit_main
from cifar_lightning.module import ClassifierModule
from test_reliability import EXACT, fit_args, write_noise_folder


def float_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point weights and buffers, copied."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


class Recorder(Callback):
    """The weights after every optimizer step, and those that validation runs on."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.validated: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(float_state(pl_module))

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated.append(float_state(pl_module))


def test_ema_is_torchs_average_and_what_validation_and_the_checkpoint_use(tiny_folder, tmp_path):
    decay = 0.8
    model = ClassifierModule(arch="simple_cnn", num_classes=3, class_names=["cat", "dog", "frog"], lr=0.05)
    dm = CIFAR10DataModule(data_dir=str(tiny_folder), num_workers=0, batch_size=4, val_size=6)
    recorder = Recorder()
    trainer = pl.Trainer(max_epochs=2, callbacks=[EMA(decay=decay), recorder], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, datamodule=dm)

    # torch.optim.swa_utils' own EMA over the weights after each step (the first step copies).
    average_fn = get_ema_avg_fn(decay)
    expected = [dict(recorder.steps[0])]
    for i, weights in enumerate(recorder.steps[1:], start=1):
        expected.append({k: average_fn(expected[-1][k], w, torch.tensor(i)) for k, w in weights.items()})
    per_epoch = len(recorder.steps) // 2
    assert recorder.steps[-1]["model.0.weight"].ne(expected[-1]["model.0.weight"]).any()  # it is an average
    for epoch, validated in enumerate(recorder.validated):  # validation ran on the average
        for k, v in validated.items():
            torch.testing.assert_close(v, expected[(epoch + 1) * per_epoch - 1][k])
    path = tmp_path / "after.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    for k, v in expected[-1].items():
        torch.testing.assert_close(model.state_dict()[k], v)  # the fit ends on the average
        torch.testing.assert_close(saved["state_dict"][k], v)  # evaluate, predict and export read this


def test_ema_flag_config_file_and_resume(tmp_path):
    data = write_noise_folder(tmp_path / "data", n_train=10)
    whole = fit_main(fit_args(data, tmp_path / "whole", "--epochs", "2", *EXACT, "--ema", "0.9"))
    run = Path(whole["report_path"]).parent
    callbacks = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["callbacks"]
    assert any(c["class_path"] == "cifar_lightning.callbacks.EMA" and c["init_args"]["decay"] == 0.9 for c in callbacks)
    # The fit's test of its best checkpoint ran on the average, as evaluate does from the file.
    evaluated = evaluate_main([whole["checkpoint"], "--output-dir", str(tmp_path / "eval")])
    assert evaluated["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-6)

    # The same run in a YAML file, stopped after one epoch and resumed: the average continues.
    # (EXACT: a schedule that does not depend on the number of epochs asked for.)
    config = tmp_path / "ema.yaml"
    config.write_text(yaml.safe_dump(
        {"trainer": {"callbacks": [{"class_path": "cifar_lightning.callbacks.EMA", "init_args": {"decay": 0.9}}]}}
    ))  # fmt: skip
    fit_main(fit_args(data, tmp_path / "parts", "--config", str(config), "--epochs", "1", *EXACT))
    resumed = fit_main(fit_args(data, tmp_path / "parts", "--config", str(config), "--epochs", "2", *EXACT, "--resume"))
    ours, theirs = (torch.load(r["last_checkpoint"], weights_only=True) for r in (resumed, whole))
    assert "current_model_state" in ours  # the trained weights beside the average
    for k, v in theirs["state_dict"].items():
        torch.testing.assert_close(ours["state_dict"][k], v, msg=k)
        torch.testing.assert_close(ours["current_model_state"][k], theirs["current_model_state"][k], msg=k)
    assert resumed["test_acc"] == pytest.approx(whole["test_acc"], abs=1e-9)


def test_ema_decay_out_of_range_is_a_user_error(tmp_path, capsys):
    data = write_noise_folder(tmp_path / "data", n_train=4)
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(data, tmp_path, "--epochs", "1", "--ema", "1.5"))
    assert exc.value.code == 2
    assert "the EMA decay must be between 0 and 1 (exclusive), got 1.5" in capsys.readouterr().err
