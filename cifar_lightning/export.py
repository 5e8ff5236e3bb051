"""Export a checkpoint to ONNX or TorchScript, with the normalisation inside the graph, and verify it.

The exported model takes what a consumer has: raw RGB in [0, 1], shape (B, 3, S, S) (S: the training
image size, 32 for CIFAR), any batch
size; it returns logits (B, C). The class names, architecture and normalisation travel with the
file (ONNX ``metadata_props``, a ``metadata.json`` extra file for TorchScript).

Verification runs the exported file (onnxruntime for ONNX, ``torch.jit.load`` for TorchScript)
and the checkpoint's PyTorch module on the same images, at the full batch and at batch size 1,
and fails when ``max |logit difference| > atol + rtol * max |logit|``. Float32 kernels differ in
summation order between runtimes, so differences of about 1e-6 are expected; deep untrained
networks with huge logits are why the tolerance has a relative part.

ONNX uses the ``torch.export`` based exporter (``dynamo=True``, the default since torch 2.9);
every registered architecture exports with it on torch 2.14. The older TorchScript-based ONNX
exporter is deprecated there, so it is not used.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cifar_lightning.constants import IMAGE_SIZE
from cifar_lightning.errors import UserError, exit_on_user_error
from cifar_lightning.inference import images_to_tensor
from cifar_lightning.models.pretrained import Normalized
from cifar_lightning.module import ClassifierModule

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5
VERIFY_IMAGES = 64


class RawImageClassifier(Normalized):
    """The network with its input normalisation: raw RGB in [0, 1] (B, 3, H, W) to logits (B, C)."""

    def __init__(self, module: ClassifierModule) -> None:
        super().__init__(module.model, module.hparams.norm_mean, module.hparams.norm_std)


def input_size(module: ClassifierModule) -> int:
    """The side of the images ``module`` was trained on (32 for checkpoints that predate the setting)."""
    return int(module.hparams.get("image_size", IMAGE_SIZE))


def export_metadata(module: ClassifierModule) -> dict[str, str]:
    """What a consumer needs besides the graph, as strings (ONNX metadata values are strings); the
    superclasses too when the classes are grouped (the group index of each class, in label order)."""
    hp = module.hparams
    size = input_size(module)
    groups = {}
    if hp.get("superclasses") is not None:
        groups = {
            "superclass_names": json.dumps(list(hp.superclass_names), ensure_ascii=False),
            "superclasses": json.dumps(list(hp.superclasses)),
        }
    return {
        "arch": hp.arch,
        "num_classes": str(len(module.class_names)),
        "class_names": json.dumps(list(module.class_names), ensure_ascii=False),
        **groups,
        "input": f"RGB in [0, 1], shape (B, 3, {size}, {size}), float32; normalisation is inside the model",
        "image_size": str(size),
        "norm_mean": json.dumps(list(hp.norm_mean)),
        "norm_std": json.dumps(list(hp.norm_std)),
        "output": "logits (B, num_classes); softmax gives probabilities",
    }


def export_onnx(module: ClassifierModule, path: str | Path) -> Path:
    """Write ``module`` as a single-file ONNX model with a dynamic batch dimension."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = RawImageClassifier(module).eval()
    example = torch.rand(2, 3, input_size(module), input_size(module))
    # The exporter narrates its steps on stdout; a script's output should be its own result.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,  # one file; CIFAR networks are far below ONNX's 2 GB limit
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    model = onnx.load(str(path))
    for key, value in export_metadata(module).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def export_torchscript(module: ClassifierModule, path: str | Path) -> Path:
    """Write ``module`` as a traced TorchScript file that ``torch.jit.load`` (or libtorch) reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = RawImageClassifier(module).eval()
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream, but it is still the format libtorch (C++) loads.
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=Warning)
        traced = torch.jit.trace(wrapper, torch.rand(2, 3, input_size(module), input_size(module)))
        torch.jit.save(traced, str(path), _extra_files={"metadata.json": json.dumps(export_metadata(module))})
    return path


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def onnx_runner(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function float32 images (B, 3, 32, 32) -> logits running the ONNX file in onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def torchscript_runner(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """The same for a TorchScript file, loaded with ``torch.jit.load``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=Warning)
        scripted = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        return scripted(torch.from_numpy(x)).numpy()

    return run


RUNNERS = {"onnx": onnx_runner, "torchscript": torchscript_runner}
EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}


def verification_images(
    data_dir: str | None, n: int = VERIFY_IMAGES, seed: int = 0, dataset: dict[str, str] | None = None
) -> tuple[np.ndarray, str]:
    """(float32 images (n, 3, S, S) in [0, 1], where they came from): test images, else noise (S:
    ``dataset``'s ``image_size``, else 32).

    ``dataset``: the checkpoint's ``checkpoint.stored_dataset``, so the data is read as it was in training.
    """
    if data_dir is None:
        rng = np.random.default_rng(seed)
        size = (dataset or {}).get("image_size", IMAGE_SIZE)
        return rng.random((n, 3, size, size), dtype=np.float32), f"{n} random images (no --data-dir given)"
    from cifar_lightning.data import CIFAR10DataModule

    dm = CIFAR10DataModule(data_dir=data_dir, download=False, num_workers=0, **(dataset or {}))
    test_images, _ = dm.split_arrays("test")
    idx = np.sort(np.random.default_rng(seed).permutation(len(test_images))[:n])
    images = test_images[idx]  # (n, 32, 32, 3) uint8
    return images_to_tensor(images).numpy(), f"{len(idx)} test images from {data_dir}"


@torch.no_grad()
def verify_export(
    module: ClassifierModule,
    run: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> dict[str, Any]:
    """Compare an exported model's logits with the PyTorch module's on ``images`` (B, 3, 32, 32).

    The whole batch and its first image alone are both checked, so a batch size baked into the
    graph fails here rather than in the consumer's code.
    """
    module = module.cpu().eval()
    expected = module(module.normalize(torch.from_numpy(images))).float().numpy()
    got = run(images)
    single = run(images[:1])
    diff = max(float(np.abs(got - expected).max()), float(np.abs(single - expected[:1]).max()))
    tolerance = atol + rtol * float(np.abs(expected).max())
    return {
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "passed": bool(diff <= tolerance),
        "top1_agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
        "images": len(images),
    }


# ---------------------------------------------------------------------------------------------
# scripts/export.py
# ---------------------------------------------------------------------------------------------


def default_export_path(checkpoint: str | Path, fmt: str) -> Path:
    """Beside the checkpoint: ``best-...ckpt`` -> ``best-....onnx`` or ``best-....torchscript.pt``."""
    ckpt = Path(checkpoint)
    return ckpt.with_name(ckpt.stem + FORMATS[fmt])


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/export.py",
        description="Export a checkpoint to ONNX or TorchScript (input: raw RGB in [0, 1]) and verify it.",
        epilog="Exit code: 0 when the export matches PyTorch within the tolerance, 1 when not, 2 on a usage error.",
    )
    parser.add_argument(
        "checkpoint", help="a .ckpt file written by scripts/fit.py, or a network with trained weights (resnet20)"
    )
    parser.add_argument("--format", choices=sorted(FORMATS), required=True)
    parser.add_argument("--output", help="file to write (default: beside the checkpoint)")
    parser.add_argument("--data-dir", help="data whose test images verify the export (default: random images)")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="absolute tolerance on logits")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="tolerance relative to the largest logit")
    return parser


@exit_on_user_error
def export_main(argv: list[str] | None = None) -> int:
    """``scripts/export.py``: export, verify, print the result; returns the exit code (0 or 1)."""
    from cifar_lightning.checkpoint import build_classifier, read_checkpoint, stored_dataset

    args = export_parser().parse_args(argv)
    if args.atol < 0 or args.rtol < 0:
        raise UserError(f"--atol and --rtol must be 0 or more, got {args.atol} and {args.rtol}.")
    ckpt = read_checkpoint(args.checkpoint)
    module = build_classifier(ckpt, args.checkpoint)
    images, source = verification_images(args.data_dir, dataset=stored_dataset(ckpt))
    path = Path(args.output) if args.output else default_export_path(args.checkpoint, args.format)
    start = time.perf_counter()
    EXPORTERS[args.format](module, path)
    seconds = time.perf_counter() - start
    result = verify_export(module, RUNNERS[args.format](path), images, atol=args.atol, rtol=args.rtol)
    print(f"{args.format}: {path} ({path.stat().st_size / 2**20:.1f} MiB, {seconds:.1f} s)")
    verdict = "<=" if result["passed"] else "> tolerance"
    print(
        f"verified on {source}: max |logit difference| {result['max_abs_diff']:.2e} {verdict} "
        f"{result['tolerance']:.2e}; top-1 agreement {100 * result['top1_agreement']:.1f}%"
    )
    if not result["passed"]:
        print(f"error: {path} differs from PyTorch by more than the tolerance", file=sys.stderr)
        return 1
    return 0
