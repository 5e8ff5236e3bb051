"""ClassifierModule's training parts: MuonSGD, the schedules, and the per-epoch metrics."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from cifar_lightning import CIFAR10DataModule, ClassifierModule
from cifar_lightning.errors import UserError
from cifar_lightning.optim import MuonSGD, WarmupCosine, WarmupLinear, muon_param_groups, orthogonalize


@pytest.mark.parametrize("shape", [(64, 216), (256, 64), (10, 10)])
def test_orthogonalize_flattens_the_spectrum(shape):
    torch.manual_seed(0)
    # a badly conditioned matrix: singular values spread over three orders of magnitude
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    s = torch.logspace(0, -3, k)
    g = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    out = orthogonalize(g, steps=5)
    sv = torch.linalg.svdvals(out)
    assert out.shape == g.shape and out.dtype == g.dtype
    # the large directions end near 1 (the iteration overshoots to about 0.7-1.2 by design),
    # the ones 1000x smaller are lifted far above their 1e-3
    assert 0.6 < sv.max() < 1.3
    assert sv[: k // 2].min() > 0.5
    assert sv.min() > 0.05
    # same singular vectors: out is U f(S) V^T, so U^T out V is diagonal
    inner = u[:, :k].T @ out @ v[:, :k]
    off = inner - torch.diag(torch.diagonal(inner))
    assert off.abs().max() < 1e-3
    with pytest.raises(ValueError, match="2-D"):
        orthogonalize(torch.ones(3))


def test_muon_step_normalizes_filters_and_moves_by_lr():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, bias=False)
    bias = torch.nn.Parameter(torch.ones(16))
    opt = MuonSGD(
        [{"params": [conv.weight], "muon": True, "lr": 0.1, "momentum": 0.0}, {"params": [bias]}],
        lr=0.5,
        momentum=0.0,
        weight_decay=0.0,
    )
    with torch.no_grad():
        conv.weight.mul_(10)  # any scale: Muon first brings it back to norm sqrt(out_channels)
    before = conv.weight.detach().clone()
    conv.weight.grad = torch.randn_like(conv.weight)
    bias.grad = torch.full_like(bias, 2.0)
    opt.step()
    normalized = before * (16**0.5 / before.norm())
    update = (normalized - conv.weight.detach()).reshape(16, -1) / 0.1
    sv = torch.linalg.svdvals(update)
    assert sv.shape == (16,) and 0.5 < sv.min() and sv.max() < 1.5  # an (about) orthogonal step
    assert torch.allclose(bias.detach(), torch.full((16,), 1.0 - 0.5 * 2.0))  # plain SGD
    with pytest.raises(ValueError, match="not vectors"):
        MuonSGD([{"params": [bias], "muon": True}])


def test_muon_sgd_groups_match_torch_sgd_on_non_muon_params():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    ours = MuonSGD([a], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    ref = torch.optim.SGD([b], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    for _ in range(4):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b)


def test_muon_steps_over_all_tensors_at_once_as_one_at_a_time():
    # The optimizer runs each operation over a group's tensors at once; the result must be the
    # arithmetic of one tensor at a time, to the bit, for Muon and SGD groups, with and without
    # Nesterov, a parameter that gets no gradient in a step, and a fresh buffer mid-run.
    from cifar_lightning.optim import orthogonalize

    def reference(params, groups, state):
        with torch.no_grad():
            for g, group in zip(params, groups):
                for p in g:
                    if p.grad is None:
                        continue
                    grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                    buf = state.get(p)
                    if buf is None:
                        buf = state[p] = grad.detach().clone()
                    else:
                        buf.mul_(group["momentum"]).add_(grad)
                    grad = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    if group["muon"]:
                        p.mul_(p.shape[0] ** 0.5 / p.norm().clamp_min(1e-12))
                        grad = orthogonalize(grad.reshape(p.shape[0], -1), 3).view_as(p)
                    p.add_(grad, alpha=-group["lr"])

    torch.manual_seed(0)
    shapes = [[(8, 4, 3, 3), (16, 8, 3, 3)], [(16,), (8,), (5, 3)]]
    settings = [
        dict(muon=True, lr=0.2, momentum=0.6, nesterov=True, weight_decay=0.0),
        dict(muon=False, lr=0.05, momentum=0.85, nesterov=False, weight_decay=1e-3),
    ]
    ours = [[torch.nn.Parameter(torch.randn(s)) for s in g] for g in shapes]
    theirs = [[torch.nn.Parameter(p.detach().clone()) for p in g] for g in ours]
    opt = MuonSGD([{"params": g, **st} for g, st in zip(ours, settings)])
    state: dict = {}
    for step in range(5):
        for g_ours, g_theirs in zip(ours, theirs):
            for i, (a, b) in enumerate(zip(g_ours, g_theirs)):
                skip = (step, i) in ((0, 0), (2, 1))  # no gradient: a buffer that starts a step later, a gap
                grad = None if skip else torch.randn(a.shape)
                a.grad, b.grad = (None, None) if skip else (grad.clone(), grad.clone())
        opt.step()
        reference(theirs, settings, state)
        for a, b in zip(sum(ours, []), sum(theirs, [])):
            assert torch.equal(a, b)


def test_muon_param_groups_put_only_conv_filters_under_muon():
    model = ClassifierModule(arch="fastnet", num_classes=10).model
    muon, rest = muon_param_groups(model, 0.2, 0.6)
    assert muon["muon"] and muon["lr"] == 0.2 and muon["momentum"] == 0.6
    assert all(p.ndim == 4 for p in muon["params"]) and len(muon["params"]) == 6  # 3 groups x 2 convs
    ids = lambda params: {id(p) for p in params}  # noqa: E731  (`in` would compare tensors)
    assert {id(model.head.weight), id(model.whiten.bias)} <= ids(rest["params"])
    assert id(model.whiten.weight) not in ids(rest["params"]) | ids(muon["params"])  # frozen


def test_module_with_muon_learns():
    torch.manual_seed(0)
    model = ClassifierModule(
        arch="simple_cnn", num_classes=3, optimizer="muon", lr=0.05, muon_lr=0.05, scheduler="none", weight_decay=0.0
    )
    opt = model.configure_optimizers()
    assert isinstance(opt, MuonSGD) and [g["muon"] for g in opt.param_groups] == [True, False]
    x = torch.randn(32, 3, 32, 32)
    y = torch.arange(32) % 3
    x[torch.arange(32), y] += 2.0  # the label is the brightest channel
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(UserError, match="muon_lr must be positive"):
        ClassifierModule(arch="simple_cnn", optimizer="muon", muon_lr=0.0)


def test_linear_and_cosine_schedules():
    lin, cos = WarmupLinear(2, 10, 0.1), WarmupCosine(2, 10, 0.1)
    assert [lin(s) for s in (0, 1)] == [0.5, 1.0] == [cos(s) for s in (0, 1)]
    assert lin(2) == 1.0 and lin(6) == pytest.approx(0.55) and lin(10) == pytest.approx(0.1)
    assert cos(6) == pytest.approx(0.55) and cos(4) > lin(4)  # cosine stays higher early on
    assert WarmupLinear(0, 4)(3) == pytest.approx(0.25)  # airbench94_muon: 1 - step / total


def test_epoch_loss_is_the_mean_over_samples_and_keeps_nan():
    torch.manual_seed(0)
    model = ClassifierModule(arch="simple_cnn", num_classes=3)
    model.log = lambda *a, **k: None  # outside a Trainer
    batches = [
        (torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))),
        (torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])),
    ]
    with torch.no_grad():
        for batch in batches:
            model._shared_step(batch, "val")
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        expected = torch.nn.functional.cross_entropy(model(x), y)  # all 11 samples weigh the same
        expected_acc = (model(x).argmax(1) == y).float().mean()
    torch.testing.assert_close(model.loss_metrics["val_"].compute(), expected)
    torch.testing.assert_close(model.acc_metrics["val_"].compute(), expected_acc)
    # a diverged step is reported as such, not dropped from the average
    model.loss_metrics["val_"].update(torch.tensor([float("nan")]))
    assert torch.isnan(model.loss_metrics["val_"].compute())


def test_logged_training_loss_and_accuracy_are_the_epoch_means_over_its_images(tiny_folder, tmp_path):
    # Recomputed from each step's own logits and targets, outside the module: every image weighs
    # the same (a smaller last batch weighs less), each epoch starts afresh.
    from lightning.pytorch.callbacks import Callback

    class Recompute(Callback):
        def __init__(self) -> None:
            self.sums: dict[int, list[float]] = {}
            self.logged: dict[int, tuple[float, float]] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logits, y = outputs["logits"].float(), outputs["targets"]
            s = self.sums.setdefault(trainer.current_epoch, [0.0, 0.0, 0])
            s[0] += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            s[1] += float((logits.argmax(1) == y).sum())
            s[2] += len(y)

        def on_train_epoch_end(self, trainer, pl_module):  # a callback: it runs before the module's hook
            m = trainer.callback_metrics
            self.logged[trainer.current_epoch] = (float(m["train/loss"]), float(m["train/acc"]))

    dm = CIFAR10DataModule(str(tiny_folder), download=False, val_size=6, batch_size=7, num_workers=0)  # 30 = 4 x 7 + 2
    model = ClassifierModule(arch="simple_cnn", num_classes=3, class_names=["cat", "dog", "frog"], lr=0.05)
    rec = Recompute()
    pl.Trainer(
        max_epochs=2,
        callbacks=[rec],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    ).fit(model, dm)
    for epoch, (loss_sum, correct, n) in rec.sums.items():
        assert n == 30
        assert rec.logged[epoch][0] == pytest.approx(loss_sum / n, rel=1e-5)
        assert rec.logged[epoch][1] == pytest.approx(correct / n, abs=1e-6)
    assert rec.logged[0] != rec.logged[1]
    assert model.images_seen["train"] == 30


def test_schedule_spans_max_steps_and_warmup_counts_real_epochs(tiny_folder, tmp_path):
    dm = CIFAR10DataModule(str(tiny_folder), download=False, val_size=6, batch_size=5, num_workers=0)
    model = ClassifierModule(arch="simple_cnn", num_classes=3, scheduler="linear", warmup_epochs=1.0)
    trainer = pl.Trainer(
        max_epochs=10,
        max_steps=9,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    shape = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    # 30 training images in batches of 5: 6 steps an epoch; the run stops at 9 steps
    assert isinstance(shape, WarmupLinear) and shape.warmup == 6 and shape.total == 9
    assert trainer.global_step == 9


def test_multistep_with_a_warmup_epoch_ramps_then_steps_by_epochs(tiny_folder, tmp_path):
    """weiaicunzai's CIFAR-100 schedule (1 linear warm-up epoch, then lr x 0.2 at epochs), through a
    real Trainer whose max_steps cuts the run short: the epochs are the loader's real ones."""
    from cifar_lightning.optim import WarmupPiecewise

    dm = CIFAR10DataModule(str(tiny_folder), download=False, val_size=6, batch_size=5, num_workers=0)
    model = ClassifierModule(
        arch="simple_cnn", num_classes=3, scheduler="multistep", milestones=[2, 4], gamma=0.2, warmup_epochs=1, lr=0.1
    )
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(
        max_epochs=10,
        max_steps=27,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        callbacks=[Record()],
    )
    trainer.fit(model, datamodule=dm)
    config = trainer.lr_scheduler_configs[0]
    shape = config.scheduler.lr_lambdas[0]
    # 30 training images in batches of 5: 6 steps an epoch, whatever max_steps says
    assert config.interval == "step" and isinstance(shape, WarmupPiecewise)
    assert shape.warmup == 6 and shape.milestones == [12, 24] and shape.total == 27
    assert lrs[0] == pytest.approx(0.1 / 6) and lrs[5] == pytest.approx(0.1)  # 6 steps of ramp
    assert lrs[6:12] == pytest.approx([0.1] * 6)
    assert lrs[12] == pytest.approx(0.02) and lrs[23] == pytest.approx(0.02) and lrs[24] == pytest.approx(0.004)


@pytest.mark.parametrize("steps", range(1, 10))
def test_onecycle_runs_however_short_the_run(steps):
    from types import SimpleNamespace

    from cifar_lightning.optim import build_scheduler

    module = ClassifierModule(arch="lenet5", scheduler="onecycle", pct_start=0.25, lr=0.1)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    sched = build_scheduler(opt, module.hparams, SimpleNamespace(estimated_stepping_batches=steps))["lr_scheduler"]
    lrs = []
    for _ in range(steps):  # (pct_start x 4 steps = 1 divides by zero in torch's OneCycleLR as given)
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        sched["scheduler"].step()
    assert all(0 <= lr <= 0.1 + 1e-9 for lr in lrs) and lrs[-1] < 1e-3
    if steps >= 8:  # long enough for the recipe's own warm-up: pct_start is left as given
        assert sched["scheduler"].total_steps == steps and lrs[0] < 0.01 and max(lrs) > 0.09


def test_onecycle_with_muon_keeps_each_group_at_its_own_lr_and_momentum():
    from types import SimpleNamespace

    from cifar_lightning.optim import build_optimizer, build_scheduler

    module = ClassifierModule(
        arch="fastnet",
        optimizer="muon",
        scheduler="onecycle",
        pct_start=0.25,
        lr=2.0,
        momentum=0.85,
        muon_lr=0.24,
        muon_momentum=0.6,
    )
    opt = build_optimizer(module.model, module.hparams)
    sched = build_scheduler(opt, module.hparams, SimpleNamespace(estimated_stepping_batches=20))["lr_scheduler"][
        "scheduler"
    ]
    peaks = {True: 0.0, False: 0.0}
    for _ in range(20):
        for g in opt.param_groups:
            peaks[g["muon"]] = max(peaks[g["muon"]], g["lr"])
            if g["muon"]:
                assert g["momentum"] == 0.6  # Muon's own momentum, not the cycle's 0.85-0.95
            else:
                assert 0.85 - 1e-9 <= g["momentum"] <= 0.95 + 1e-9
        opt.step()
        sched.step()
    assert peaks[True] == pytest.approx(0.24, rel=0.01) and peaks[False] == pytest.approx(2.0, rel=0.01)


def test_compiled_fit_with_the_summary_on_compiles_once(tiny_folder, tmp_path):
    # The model summary must not send its example through the compiled network, and the steps
    # after the first must not recompile. (The eager backend: dynamo's graphs without the code
    # generation, which the GPU tests run.)
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            graphs.append(counters["stats"]["unique_graphs"])

    # 30 training images in batches of 5: every batch the same size
    dm = CIFAR10DataModule(str(tiny_folder), download=False, val_size=6, batch_size=5, num_workers=0)
    model = ClassifierModule(arch="simple_cnn", num_classes=3, compile=True, compile_backend="eager")
    trainer = pl.Trainer(
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=True,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[Count()],
    )
    trainer.fit(model, datamodule=dm)
    torch._dynamo.reset()
    assert graphs == [1] * 6, graphs


def test_a_resized_schedule_keeps_its_shape_and_its_state():
    from cifar_lightning.optim import ResizableOneCycleLR, fit_schedules

    shape = WarmupCosine(2, 10, 0.0)
    before = [shape(s) for s in range(11)]
    assert (
        fit_schedules(
            [torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], 1.0), shape)],
            4,
            10,
        )
        == []
    )
    shape.resize(4, 16)  # resumed at step 4 with twice the steps per epoch left
    assert shape(4) == before[4] and shape(10) == pytest.approx(before[7])
    assert shape(16) == pytest.approx(0.0) and shape.end() == 16
    # an ended schedule, resumed for more steps, stays ended
    assert (
        fit_schedules(
            [torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], 1.0), shape)],
            16,
            20,
        )
        == []
    )
    assert shape(20) == pytest.approx(0.0)

    def one_cycle(total):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0, momentum=0.9)
        return opt, ResizableOneCycleLR(opt, max_lr=1.0, total_steps=total, pct_start=0.25)

    opt, sched = one_cycle(10)
    reference = []
    for _ in range(10):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    opt, sched = one_cycle(10)
    for _ in range(4):
        opt.step()
        sched.step()
    assert fit_schedules([sched], 4, 16) == [(10, 16)]
    state, opt_state = sched.state_dict(), opt.state_dict()
    opt, sched = one_cycle(10)  # as Lightning restores a run: the optimizer, then the resized schedule
    opt.load_state_dict(opt_state)
    sched.load_state_dict(state)
    lrs = []
    for _ in range(4, 16):  # 12 more steps, where 6 were planned: no "tried to step" error
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(reference[4]) and lrs[6] == pytest.approx(reference[7])
    assert lrs[-2] == pytest.approx(reference[9]) == lrs[-1]  # at the bottom of the cycle, not past it


def test_fastnet_without_its_initialisation_data_is_an_error(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    model = ClassifierModule(arch="fastnet", num_classes=3)
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(UserError, match="fastnet sets its first layer from training images"):
        trainer.fit(model, train_dataloaders=loader)
    model.model.init_from_data(torch.randn(64, 3, 32, 32))  # initialised by hand: the fit runs
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=loader)
    assert trainer.global_step == 1


def test_hook_names_skip_the_module_attribute_lookup(tiny_folder, tmp_path, monkeypatch):
    # Lightning names the running hook on the module before and after every hook of a step; those
    # writes must not go through nn.Module.__setattr__ (Python lookups on every hook), while
    # every other attribute still does, and the hook's name still reads back.
    names, seen = [], []
    module_setattr = torch.nn.Module.__setattr__

    def counting(self, name, value):
        names.append(name)
        module_setattr(self, name, value)

    class Look(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module._current_fx_name)

    dm = CIFAR10DataModule(str(tiny_folder), download=False, val_size=6, batch_size=5, num_workers=0)
    model = ClassifierModule(arch="simple_cnn", num_classes=3)
    monkeypatch.setattr(torch.nn.Module, "__setattr__", counting)
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Look()],
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3 and seen == ["on_train_batch_end"] * 3
    assert "_current_fx_name" not in names
    model.extra = torch.nn.Linear(1, 1)  # a submodule still registers as one
    assert "extra" in names and "extra" in model._modules
