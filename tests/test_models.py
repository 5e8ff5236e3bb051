"""Tests for the model zoo. Every test that loops over ``list_models()`` covers a new network
without edits; the one thing a new network must add here is its parameter count."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import arch_params

from cifar_lightning.models import (
    UnknownModelError,
    count_macs,
    count_parameters,
    create_model,
    list_models,
    model_info,
)

ROOT = Path(__file__).resolve().parents[1]
MODELS = list_models()

# Exact counts for 10 classes. The standard families were checked against their papers and
# kuangliu/pytorch-cifar; see each builder's docstring for where a count comes from.
EXPECTED_PARAMS = {
    "mynet": 5_499_434,
    "simple_cnn": 145_578,
    "dainet7": 1_149_770,
    "lenet5": 62_006,
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "resnet50": 23_520_842,
    "resnet101": 42_512_970,
    "resnet152": 58_156_618,
    "vgg11": 9_231_114,
    "vgg13": 9_416_010,
    "vgg16": 14_728_266,
    "vgg19": 20_040_522,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "preact_resnet18": 11_172_170,  # kuangliu's 11,171,146 + the paper's final BN (1,024)
    "wrn28_10": 36_479_194,  # "36.5M" in table 1 of the paper
    "wrn16_8": 10_961_370,  # the paper gives 11.0M
    "mobilenetv2": 2_296_922,
    "densenet121": 6_956_298,
    "vit": 3_195_146,
    "fastnet": 1_972_792,
}


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _build(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kwargs)


def test_every_model_states_its_parameter_count():
    assert sorted(EXPECTED_PARAMS) == MODELS


@pytest.mark.parametrize("name", arch_params())
def test_parameter_count(name):
    with torch.device("meta"):  # same count, no time spent initialising weights
        model = create_model(name)
    assert count_parameters(model) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", arch_params())
def test_builder_signature(name):
    builder = model_info(name).builder
    params = inspect.signature(builder).parameters
    assert params["num_classes"].default == 10
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params.values())
    assert builder.__doc__ and model_info(name).source
    with pytest.raises(TypeError):
        create_model(name, no_such_option=1)  # options are checked, never silently ignored


@pytest.mark.parametrize("name", arch_params())
def test_forward_backward(name):
    model = _build(name, num_classes=7).train()
    out = model(_images())
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 6])).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:  # frozen weights (fastnet's whitening) get none by design
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", arch_params())
def test_state_dict_round_trip(name):
    model = _build(name, seed=0).eval()
    if hasattr(model, "init_from_data"):
        model.init_from_data(_images(8, seed=1))
    x = _images()
    with torch.no_grad():
        expected = model(x)
        assert expected.shape == (2, 10)
        assert torch.isfinite(expected).all()
        fresh = _build(name, seed=1)
        fresh.load_state_dict(model.state_dict())
        fresh.eval()
        if hasattr(fresh, "init_from_data"):
            fresh.init_from_data(_images(8, seed=2))  # loaded weights are kept
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("name", arch_params())
def test_channels_last(name):
    model = _build(name).eval()
    x = _images()
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("vit", {"pool": "mean", "depth": 2, "dim": 64, "heads": 4}),
        ("fastnet", {"widths": (16, 32, 32), "whiten_kernel_size": 3, "learn_bn_scale": True}),
        ("wrn28_10", {"dropout": 0.3}),
    ],
)
def test_options(name, options):
    model = _build(name, num_classes=3, **options).train()
    if hasattr(model, "init_from_data"):
        model.init_from_data(_images(4))
    model(_images()).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_model():
    with pytest.raises(UnknownModelError, match="resnet18") as info:
        create_model("unknown")
    assert isinstance(info.value, ValueError)
    assert all(name in str(info.value) for name in MODELS)


def test_count_macs():
    # LeNet-5 by hand: conv1 6*28*28*75 + conv2 16*10*10*150 + fc 400*120 + 120*84 + 84*10.
    model = create_model("lenet5").train()
    assert count_macs(model) == 352_800 + 240_000 + 48_000 + 10_080 + 840
    assert model.training  # the count leaves the model as it was


# ---- fastnet: data-dependent whitening -------------------------------------------------------


def _correlated_images(n: int = 64, seed: int = 0) -> torch.Tensor:
    # Neighbouring pixels and the three channels are correlated, as in natural images.
    x = _images(n, seed)
    x = x + 0.8 * x.roll(1, dims=-1) + 0.5 * x.roll(1, dims=-2)
    mix = torch.tensor([[1.0, 0.6, 0.3], [0.6, 1.0, 0.6], [0.3, 0.6, 1.0]])
    return torch.einsum("oc,nchw->nohw", mix, x)


def test_fastnet_whitening_is_frozen():
    model = create_model("fastnet")
    assert not model.whiten.weight.requires_grad
    assert not model.whiten_initialized
    assert count_parameters(model, trainable_only=True) < count_parameters(model)


def test_fastnet_init_from_data_is_idempotent():
    model = _build("fastnet")
    before = model.whiten.weight.clone()
    model.init_from_data(_correlated_images(seed=0))
    after = model.whiten.weight.clone()
    assert not torch.equal(before, after)
    assert model.whiten_initialized
    assert "whiten_initialized" in model.state_dict()
    model.init_from_data(_correlated_images(seed=1))
    assert torch.equal(model.whiten.weight, after)


def test_fastnet_whitens_patches():
    images = _correlated_images()
    model = _build("fastnet")
    model.init_from_data(images)
    with torch.no_grad():
        out = model.whiten(images)  # (N, 2D, 31, 31)
    d = out.shape[1] // 2
    assert torch.equal(model.whiten.weight[d:], -model.whiten.weight[:d])  # both signs
    z = out[:, :d].permute(0, 2, 3, 1).reshape(-1, d).double()  # one whitened patch per row
    cov = torch.cov(z.T)
    torch.testing.assert_close(cov, torch.eye(d, dtype=cov.dtype), atol=2e-2, rtol=0)
    torch.testing.assert_close(z.mean(0), torch.zeros(d, dtype=z.dtype), atol=1e-3, rtol=0)


# ---- model card -------------------------------------------------------------------------------


def _card_params(text: str) -> dict[str, int]:
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([\d,]+) \|", text, flags=re.MULTILINE)
    return {name: int(count.replace(",", "")) for name, count in rows}


def test_model_card(tmp_path):
    spec = importlib.util.spec_from_file_location("model_card", ROOT / "scripts" / "model_card.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--output", str(tmp_path / "models.md")])
    text = (tmp_path / "models.md").read_text()
    assert "python scripts/model_card.py --output docs/models.md" in text.splitlines()[0]
    assert _card_params(text) == EXPECTED_PARAMS
    # The committed card lists the same models and counts (MACs may move with torch versions).
    assert _card_params((ROOT / "docs" / "models.md").read_text()) == EXPECTED_PARAMS


# ---- torch.compile ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", arch_params())
def test_torch_compile(name):
    torch._dynamo.reset()
    model = _build(name).eval()
    x = _images()
    with torch.no_grad():
        expected = model(x)
        out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
