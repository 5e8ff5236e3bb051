"""Training tricks: averages of the weights (``--ema``, ``--swa``), MixUp and CutMix, SAM."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from test_reliability import EXACT, fit_args, write_noise_folder
from torch.optim.swa_utils import get_ema_avg_fn

from cifar_lightning.callbacks import EMA, SWA
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.evaluation import evaluate_main
from cifar_lightning.fit import fit_main
from cifar_lightning.module import ClassifierModule


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
    pl.seed_everything(0)  # a fixed run: an unseeded one at this learning rate can diverge
    model = ClassifierModule(arch="simple_cnn", num_classes=3, class_names=["cat", "dog", "frog"], lr=0.01)
    dm = CIFAR10DataModule(data_dir=str(tiny_folder), num_workers=0, batch_size=4, val_size=6)
    recorder = Recorder()
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[EMA(decay=decay), recorder],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
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
    config.write_text(
        yaml.safe_dump(
            {"trainer": {"callbacks": [{"class_path": "cifar_lightning.callbacks.EMA", "init_args": {"decay": 0.9}}]}}
        )
    )
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


class EpochStarts(Callback):
    """The parameters at the start of every training epoch, and the weights validation runs on."""

    def __init__(self) -> None:
        self.starts: list[dict[str, torch.Tensor]] = []
        self.validated: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.starts.append({k: p.detach().clone() for k, p in pl_module.named_parameters()})

    def on_validation_epoch_start(self, trainer, pl_module):
        self.validated.append(float_state(pl_module))


@pytest.mark.parametrize("arch", ["resnet20", "simple_cnn"])  # with BatchNorm, and without
def test_swa_averages_epoch_weights_recomputes_batchnorm_and_validates_the_average(arch, tiny_folder, tmp_path):
    from cifar_lightning.callbacks import LastCheckpoint

    pl.seed_everything(0)
    model = ClassifierModule(arch=arch, num_classes=3, class_names=["cat", "dog", "frog"], lr=0.05)
    dm = CIFAR10DataModule(data_dir=str(tiny_folder), num_workers=0, batch_size=6, val_size=6)
    starts = EpochStarts()  # before SWA in the list: it sees each epoch's weights before SWA's update
    trainer = pl.Trainer(
        max_epochs=4,
        callbacks=[starts, SWA(swa_lrs=0.01, swa_epoch_start=3), LastCheckpoint()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)

    # Averaging from epoch 3 of 4 (1-based): the weights at the starts of the 0-based epochs 2 and
    # 3, equally weighted, as torch.optim.swa_utils.AveragedModel would average them.
    assert len(starts.starts) == 5  # 4 epochs and the BatchNorm pass
    expected = {k: (starts.starts[2][k] + starts.starts[3][k]) / 2 for k in starts.starts[2]}
    key = next(iter(expected))
    assert starts.starts[3][key].ne(expected[key]).any()  # an average, not one epoch's weights
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k, v in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[k], v, msg=k)
        torch.testing.assert_close(starts.validated[-1][k], v, msg=k)  # the last validation ran on it
        torch.testing.assert_close(saved[k], v, msg=k)  # last.ckpt holds it: what fit.py tests
    batches = trainer.num_training_batches
    assert trainer.current_epoch == 5 and trainer.global_step == 4 * batches + 1
    if arch == "simple_cnn":
        return
    # The BatchNorm statistics were recomputed for the average over one pass: reset, then counted
    # over exactly one epoch's batches (a cumulative mean), where training counted them all.
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == batches
    assert bn.momentum is not None  # the training momentum is back once the pass is over


def test_swa_flag_tests_the_average_through_fit_and_evaluate(tmp_path):
    data = write_noise_folder(tmp_path / "data", n_train=10)
    report = fit_main(
        fit_args(data, tmp_path / "runs", "--arch", "resnet20", "--epochs", "3", *EXACT, "--swa", "0.005")
    )
    run = Path(report["report_path"]).parent
    callbacks = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["callbacks"]
    assert any(
        c["class_path"] == "cifar_lightning.callbacks.SWA" and c["init_args"]["swa_lrs"] == 0.005 for c in callbacks
    )
    # The average is the run's result: the report tested last.ckpt, which holds it, and evaluate
    # on that file gives the same figures.
    assert report["checkpoint"] == report["last_checkpoint"]
    evaluated = evaluate_main([report["checkpoint"], "--output-dir", str(tmp_path / "eval")])
    assert evaluated["test_loss"] == pytest.approx(report["test_loss"], rel=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--swa", "0"), "the SWA learning rate must be positive, got 0.0"),
        (("--swa", "0.01", "--ema", "0.9"), "SWA and EMA both average the weights: use one of them"),
        (("--swa", "0.01", "--trainer.max_steps", "3"), "give the length as --epochs N only"),
        (("--swa", "0.01", "--optimizer", "sam"), "SWA cannot run with --optimizer sam"),
    ],
    ids=["lr", "with-ema", "max-steps", "sam"],
)
def test_swa_settings_it_cannot_serve_are_user_errors(extra, message, tmp_path, capsys):
    data = write_noise_folder(tmp_path / "data", n_train=4)
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(data, tmp_path, "--epochs", "2", *extra))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before the first step


# ---------------------------------------------------------------------------------------------
# MixUp and CutMix
# ---------------------------------------------------------------------------------------------


def constant_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four images, image i filled with the value i; labels 0, 1, 2, 0 of 3 classes."""
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 32, 32).contiguous()
    return images, torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("seed", range(5))
def test_the_mixing_weight_and_the_cutmix_box_are_the_targets_weight(seed):
    from cifar_lightning.data.transforms import batch_mixing

    torch.manual_seed(seed)
    images, labels = constant_batch()
    mixed, soft = batch_mixing(1.0, 0.0, num_classes=3)(images, labels)
    # Image 1 is mixed with its neighbour, image 0 (value 0): its pixels are λ, its target λ on class 1.
    lam = float(soft[1, 1])
    assert torch.allclose(mixed[1], torch.full_like(mixed[1], lam)) and 0 < lam < 1
    assert torch.allclose(soft.sum(1), torch.ones(4)) and soft[1, 0] == pytest.approx(1 - lam)

    mixed, soft = batch_mixing(0.0, 1.0, num_classes=3)(images, labels)
    kept = mixed[1, 0] == 1.0  # pixels still from image 1; the others come from image 0
    assert torch.all((mixed[1, 0] == 1.0) | (mixed[1, 0] == 0.0))
    assert float(kept.float().mean()) == pytest.approx(float(soft[1, 1]), abs=1e-6)  # λ is the area kept
    rows, cols = torch.nonzero(~kept, as_tuple=True)
    if len(rows):  # the pasted part is one rectangle
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(box) == len(rows)


def test_mixed_training_batches_train_on_soft_targets_and_validation_is_untouched(tiny_folder, tmp_path):
    import torch.nn.functional as F

    seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    class Batches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["train"].append(batch[1])

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen["val"].append(batch[1])

    for loader in ("tensor", "torchvision"):
        seen["train"].clear(), seen["val"].clear()
        dm = CIFAR10DataModule(
            data_dir=str(tiny_folder), num_workers=0, batch_size=8, val_size=6, loader=loader, mixup=1.0, cutmix=1.0
        )
        model = ClassifierModule(arch="simple_cnn", num_classes=3, class_names=["cat", "dog", "frog"], lr=0.01)
        pl.Trainer(
            max_epochs=1,
            callbacks=[Batches()],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
        ).fit(model, dm)
        assert seen["train"] and all(t.shape[1] == 3 and t.is_floating_point() for t in seen["train"]), loader
        assert any((t.max(1).values < 1).any() for t in seen["train"])  # mixed, not one-hot
        assert seen["val"] and all(t.ndim == 1 and not t.is_floating_point() for t in seen["val"]), loader

    # The loss is cross-entropy against the probabilities; accuracy counts the dominant label.
    x = torch.randn(6, 3, 32, 32)
    soft = torch.softmax(torch.randn(6, 3), dim=1)
    model.eval()  # the same forward pass twice (no dropout, BatchNorm statistics fixed)
    out = model._shared_step((x, soft), "train")
    assert float(out["loss"]) == pytest.approx(float(F.cross_entropy(model(x), soft)), rel=1e-5)
    assert torch.equal(out["targets"], soft.argmax(1))


def test_mixing_flags_and_their_errors(tmp_path, capsys):
    data = write_noise_folder(tmp_path / "data", n_train=4)
    # With the model summary, whose example input also passes the batch hooks.
    report = fit_main(
        fit_args(
            data,
            tmp_path / "runs",
            "--epochs",
            "1",
            "--mixup",
            "0.2",
            "--cutmix",
            "1.0",
            "--trainer.enable_model_summary=true",
        )
    )
    config = yaml.safe_load((Path(report["report_path"]).parent / "config.yaml").read_text())
    assert (config["data"]["mixup"], config["data"]["cutmix"], config["data"]["mixup_prob"]) == (0.2, 1.0, 0.5)
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(data, tmp_path / "bad", "--epochs", "1", "--cutmix", "-1"))
    assert exc.value.code == 2
    assert "cutmix is the alpha of a Beta distribution: 0 (off) or positive, got -1.0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# SAM and ASAM
# ---------------------------------------------------------------------------------------------


def _sam_step(adaptive: bool):
    """One SAM step of SGD (lr 0.1, no momentum) on a linear model with BatchNorm; returns the
    model before and after, and the batch."""
    from cifar_lightning.optim import SAM

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, adaptive=adaptive, norm_modules=[model[1]])

    def closure():
        sam.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    sam.step(closure)
    return before, model, x, y


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_sam_step_is_the_two_pass_update_by_hand(adaptive):
    before, model, x, y = _sam_step(adaptive)

    # By hand: the gradient at w, the perturbation e, the gradient at w + e, one SGD step from w.
    names = ["0.weight", "0.bias", "1.weight", "1.bias"]

    def grads_at(weights):
        w = {n: weights[n].clone().requires_grad_(True) for n in names}
        h = x @ w["0.weight"].T + w["0.bias"]
        h = torch.nn.functional.batch_norm(h, None, None, w["1.weight"], w["1.bias"], training=True)
        loss = torch.nn.functional.cross_entropy(h, y)
        return dict(zip(names, torch.autograd.grad(loss, [w[n] for n in names])))

    g = grads_at(before)
    if adaptive:
        norm = torch.sqrt(sum(((before[n].abs() * g[n]) ** 2).sum() for n in names))
        e = {n: 0.05 * before[n] ** 2 * g[n] / norm for n in names}
    else:
        norm = torch.sqrt(sum((g[n] ** 2).sum() for n in names))
        e = {n: 0.05 * g[n] / norm for n in names}
    g2 = grads_at({n: before[n] + e[n] for n in names})
    for n in names:
        torch.testing.assert_close(model.state_dict()[n], before[n] - 0.1 * g2[n], msg=n)
    assert not torch.allclose(model.state_dict()["0.weight"], before["0.weight"] - 0.1 * g["0.weight"])  # not plain SGD

    # BatchNorm's running statistics are those of the first pass alone.
    first = torch.nn.BatchNorm1d(3)
    first.load_state_dict({k[2:]: v for k, v in before.items() if k.startswith("1.")})
    first.train()(x @ before["0.weight"].T + before["0.bias"])
    torch.testing.assert_close(model[1].running_mean, first.running_mean)
    torch.testing.assert_close(model[1].running_var, first.running_var)
    assert int(model[1].num_batches_tracked) == 1


def test_sam_through_the_fit_counts_each_batch_once_and_resumes(tmp_path, capsys):
    data = write_noise_folder(tmp_path / "data", n_train=10)
    report = fit_main(
        fit_args(
            data,
            tmp_path / "runs",
            "--epochs",
            "1",
            "--optimizer",
            "sam",
            "--sam-rho",
            "0.1",
            "--sam-adaptive",
            "--model.sam_base",
            "adamw",
        )
    )
    config = yaml.safe_load((Path(report["report_path"]).parent / "config.yaml").read_text())["model"]
    assert (config["optimizer"], config["sam_rho"], config["sam_adaptive"], config["sam_base"]) == (
        "sam",
        0.1,
        True,
        "adamw",
    )
    assert report["global_step"] == 6  # 24 training images in batches of 4: one step per batch
    state = torch.load(report["last_checkpoint"], weights_only=True)["optimizer_states"][0]
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(state["state"].values())))  # the base AdamW's state

    resumed = fit_main(
        fit_args(
            data,
            tmp_path / "runs",
            "--epochs",
            "2",
            "--optimizer",
            "sam",
            "--sam-rho",
            "0.1",
            "--sam-adaptive",
            "--model.sam_base",
            "adamw",
            "--resume",
        )
    )
    assert resumed["global_step"] == 12

    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(data, tmp_path / "bad", "--epochs", "1", "--optimizer", "sam", "--sam-rho", "0"))
    assert exc.value.code == 2 and "sam_rho must be positive, got 0.0" in capsys.readouterr().err


def test_sam_counts_each_training_image_once(tiny_folder, tmp_path):
    counted = []

    class Count(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            counted.append(pl_module.images_seen["train"])

    model = ClassifierModule(
        arch="simple_cnn", num_classes=3, class_names=["cat", "dog", "frog"], lr=0.01, optimizer="sam"
    )
    dm = CIFAR10DataModule(data_dir=str(tiny_folder), num_workers=0, batch_size=8, val_size=6)
    pl.Trainer(
        max_epochs=1,
        callbacks=[Count()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    ).fit(model, dm)
    assert counted == [30]  # 36 images less 6 for validation: once each, not once per pass


@pytest.mark.parametrize("loader", ["tensor", "torchvision"])
def test_cutout_and_random_erasing_flags_on_both_loaders(loader, tmp_path, capsys):
    data = write_noise_folder(tmp_path / "data", n_train=4)
    report = fit_main(
        fit_args(
            data,
            tmp_path / "runs",
            "--epochs",
            "1",
            "--cutout",
            "8",
            "--random-erasing",
            "0.25",
            "--data.loader",
            loader,
        )
    )
    config = yaml.safe_load((Path(report["report_path"]).parent / "config.yaml").read_text())["data"]
    assert (config["cutout"], config["random_erasing"], config["loader"]) == (8, 0.25, loader)
    with pytest.raises(SystemExit) as exc:
        fit_main(fit_args(data, tmp_path / "bad", "--epochs", "1", "--random-erasing", "2", "--data.loader", loader))
    assert (
        exc.value.code == 2 and "random_erasing is a probability, between 0 and 1, got 2.0" in capsys.readouterr().err
    )


def test_mixing_draws_come_from_the_seed_and_the_step_not_the_global_generator(tiny_folder, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    dm = CIFAR10DataModule(data_dir=str(tiny_folder), num_workers=0, batch_size=8, val_size=6, mixup=1.0, cutmix=1.0)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 3

    def mixed(step: int, global_seed: int):
        dm.trainer = SimpleNamespace(
            training=True,
            global_rank=0,
            global_step=step,
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=step)),
        )
        torch.manual_seed(global_seed)  # what dropout or anything else left the global generator at
        return dm.on_after_batch_transfer((images, labels), 0)

    first, again = mixed(5, 0), mixed(5, 123)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert any(not torch.equal(first[1], mixed(s, 0)[1]) for s in range(6, 12))  # other steps, other draws


def test_sam_with_one_cycle_and_scaled_gradients(tiny_folder, tmp_path):
    from cifar_lightning.callbacks import ScaleGradients

    seen = []

    class Perturbation(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append((optimizer.perturbed, float(next(pl_module.parameters()).grad.abs().sum())))

    model = ClassifierModule(
        arch="simple_cnn",
        num_classes=3,
        class_names=["cat", "dog", "frog"],
        lr=0.01,
        optimizer="sam",
        scheduler="onecycle",
    )
    dm = CIFAR10DataModule(data_dir=str(tiny_folder), num_workers=0, batch_size=8, val_size=6)
    scale = ScaleGradients(pattern=r".*", factor=1000.0)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[scale, Perturbation()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    momentum = trainer.optimizers[0].param_groups[0]["momentum"]
    assert trainer.global_step == 4 and 0.85 <= momentum <= 0.95  # one-cycle cycles SGD's momentum under SAM
    # Both passes reach the hooks (recorded after the scaling); only the second pass's gradients,
    # the ones SAM steps with, are scaled by 1000: its perturbation follows the plain gradient.
    assert [p for p, _ in seen] == [False, True] * 4
    # (The first step's pair: at the same weights up to SAM's small perturbation, before the
    # 1000-fold steps move them.)
    (_, plain), (_, scaled) = seen[0], seen[1]
    assert 300 < scaled / plain < 3000, seen[:2]
