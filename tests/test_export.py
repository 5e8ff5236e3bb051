"""scripts/export.py: ONNX and TorchScript files that take raw RGB and match PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_evaluate import CLASSES, trained_run

from cifar_lightning import CIFAR10DataModule
from cifar_lightning.checkpoint import load_classifier
from cifar_lightning.export import (
    DEFAULT_ATOL,
    RUNNERS,
    default_export_path,
    export_main,
    verification_images,
    verify_export,
)
from cifar_lightning.inference import images_to_tensor


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """Both formats written by the script, verified on the tiny data's test images."""
    ckpt, data = run
    out = tmp_path_factory.mktemp("export")
    paths = {"onnx": out / "model.onnx", "torchscript": out / "model.pt"}
    for fmt, path in paths.items():
        assert export_main([str(ckpt), "--format", fmt, "--output", str(path), "--data-dir", str(data)]) == 0
    return paths


def raw_test_images(data) -> np.ndarray:
    dm = CIFAR10DataModule(str(data), download=False, num_workers=0)
    dm.setup("test")
    return images_to_tensor(dm.test_set.images).numpy()  # (N, 3, 32, 32) in [0, 1]


def reference_logits(ckpt, images: np.ndarray) -> np.ndarray:
    module = load_classifier(ckpt)
    with torch.no_grad():
        return module(module.normalize(torch.from_numpy(images))).numpy()


def test_onnx_takes_raw_images_and_matches_pytorch(run, exported):
    ckpt, data = run
    images = raw_test_images(data)
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.shape[1:] == [3, 32, 32] and not isinstance(inp.shape[0], int)
    expected = reference_logits(ckpt, images)
    for batch in (images, images[:1], images[:5]):  # the batch dimension is dynamic
        (logits,) = session.run(None, {"image": batch})
        np.testing.assert_allclose(logits, expected[: len(batch)], rtol=0, atol=DEFAULT_ATOL)
    meta = {p.key: p.value for p in onnx.load(str(exported["onnx"])).metadata_props}
    assert json.loads(meta["class_names"]) == list(CLASSES) and meta["arch"] == "simple_cnn"


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_takes_raw_images_and_matches_pytorch(run, exported):
    ckpt, data = run
    images = raw_test_images(data)
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(exported["torchscript"]), _extra_files=extra)
    with torch.no_grad():
        for batch in (images, images[:1]):
            logits = scripted(torch.from_numpy(batch)).numpy()
            np.testing.assert_allclose(logits, reference_logits(ckpt, batch), rtol=0, atol=DEFAULT_ATOL)
    assert json.loads(json.loads(extra["metadata.json"])["class_names"]) == list(CLASSES)


def test_export_script_reports_the_difference(run, tmp_path, capsys):
    ckpt, _ = run
    assert export_main([str(ckpt), "--format", "torchscript", "--output", str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    assert "verified on 64 random images (no --data-dir given): max |logit difference|" in out
    assert default_export_path(ckpt, "onnx") == ckpt.with_name("last.onnx")


def test_export_fails_when_outputs_differ(run, tmp_path, capsys, monkeypatch):
    ckpt, data = run

    real_runner = RUNNERS["torchscript"]

    def off_by_a_little(path):
        run_file = real_runner(path)
        return lambda x: run_file(x) + 1e-3

    monkeypatch.setitem(RUNNERS, "torchscript", off_by_a_little)
    args = [str(ckpt), "--format", "torchscript", "--output", str(tmp_path / "m.pt"), "--data-dir", str(data)]
    code = export_main(args)
    assert code == 1
    captured = capsys.readouterr()
    assert "> tolerance" in captured.out
    assert captured.err.startswith(f"error: {tmp_path / 'm.pt'} differs from PyTorch by more than the tolerance")


def test_verify_export_tolerance_scales_with_the_logits(run):
    module = load_classifier(run[0])
    images = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)

    def exact(x):
        with torch.no_grad():
            return module(module.normalize(torch.from_numpy(x))).numpy()

    assert verify_export(module, exact, images)["max_abs_diff"] < 1e-6  # batch 1 vs 4 kernels may differ
    result = verify_export(module, lambda x: exact(x) * (1 + 1e-3), images, atol=0, rtol=1e-2)
    assert result["passed"] and result["max_abs_diff"] > 0 and result["top1_agreement"] == 1.0


@pytest.mark.data
def test_parity_on_real_cifar_images(run, exported, real_subset):
    images, source = verification_images(str(real_subset), n=64)
    assert images.shape == (64, 3, 32, 32) and "test images from" in source
    module = load_classifier(run[0])
    for fmt, path in exported.items():
        result = verify_export(module, RUNNERS[fmt](path), images)
        assert result["passed"] and result["max_abs_diff"] < DEFAULT_ATOL, (fmt, result)
        assert result["top1_agreement"] == 1.0
