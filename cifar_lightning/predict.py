"""Predict the classes of any images: files, folders, glob patterns and http(s) URLs.

Every input becomes 32x32 RGB the way the training data did (converted to RGB, resized with
bilinear filtering, which PIL antialiases when shrinking), then goes through the checkpoint's
normalisation. One bad input never stops the others: it gets one ``error: <input>: <reason>``
line, and the command exits with 1 once everything else has been predicted.

Downloads use only the standard library, with a deadline for the whole transfer (a server that
drips bytes slowly still times out) and a size cap checked before and while reading.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from cifar_lightning.constants import IMAGE_SIZE, IMAGE_SUFFIXES
from cifar_lightning.data.sources import NotAnImage, UnreadableImage, decode_image
from cifar_lightning.errors import UserError, exit_on_user_error, positive
from cifar_lightning.inference import predict_logits, resolve_device
from cifar_lightning.module import ClassifierModule
from cifar_lightning.report import to_json

DEFAULT_TIMEOUT_S = 10.0  # whole download of one URL, connect to last byte
DEFAULT_MAX_BYTES = 20 * 2**20  # 20 MiB: a large phone photo is under 10 MiB
DEFAULT_MAX_PIXELS = 50_000_000  # 50 megapixels; decoding one takes about 150 MB of memory
FORMATS = ("table", "csv", "json")
_URL_SCHEMES = ("http://", "https://")
_CHUNK = 64 * 1024


class InputError(Exception):
    """One input could not be read; the message is the reason, shown after the input's name."""


@dataclass(frozen=True)
class Limits:
    """What one input may cost: download time, bytes and decoded pixels."""

    timeout: float = DEFAULT_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class Prediction:
    """The top classes of one input, or the reason it failed."""

    input: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class name, probability), best first
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "predictions": [{"class": c, "probability": p} for c, p in self.top],
            "error": self.error,
        }


# ---------------------------------------------------------------------------------------------
# Inputs: expansion, download, decoding
# ---------------------------------------------------------------------------------------------


def is_url(item: str) -> bool:
    return item.lower().startswith(_URL_SCHEMES)


def expand_inputs(items: Sequence[str]) -> list[Prediction]:
    """One entry per image to read, in the order given, without repeats.

    Folders are searched recursively for image files, glob patterns expanded (a matched folder is
    searched too), URLs kept. An item that names nothing becomes an entry that carries its error.
    """
    found: dict[str, str | None] = {}  # input -> error so far; dicts keep insertion order
    for item in items:
        path = Path(item).expanduser()
        if is_url(item) or path.is_file():
            found.setdefault(item, None)
        elif path.is_dir():
            files = _folder_images(path)
            found.update((f, None) for f in files if f not in found)
            if not files:
                found.setdefault(item, f"the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        elif glob.has_magic(item):
            matches = sorted(glob.glob(str(path), recursive=True))
            for m in matches:
                files = _folder_images(Path(m)) if Path(m).is_dir() else [m]
                found.update((f, None) for f in files if f not in found)
            if not matches:
                found.setdefault(item, "the pattern matches no files")
        else:
            found.setdefault(item, "no such file or folder")
    return [Prediction(name, error=error) for name, error in found.items()]


def _folder_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def fetch_url(url: str, limits: Limits = Limits()) -> tuple[bytes, str]:
    """(body, content type) of an http(s) URL within the limits, else ``InputError``."""
    deadline = time.monotonic() + limits.timeout
    request = urllib.request.Request(url, headers={"User-Agent": "cifar-lightning-predict"})
    try:
        with urllib.request.urlopen(request, timeout=limits.timeout) as resp:
            ctype = resp.headers.get_content_type()
            announced = resp.headers.get("Content-Length")
            if announced and announced.isdigit() and int(announced) > limits.max_bytes:
                raise InputError(f"the server sends {int(announced):,} bytes, over the limit of {limits.max_bytes:,}")
            chunks, total = [], 0
            while chunk := resp.read1(_CHUNK):
                total += len(chunk)
                if total > limits.max_bytes:
                    raise InputError(f"the download exceeds the limit of {limits.max_bytes:,} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunks.append(chunk)
            return b"".join(chunks), ctype
    except urllib.error.HTTPError as err:
        raise InputError(f"the server answered HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, (TimeoutError, socket.timeout)):
            raise InputError(f"timed out after {limits.timeout:g} s") from None
        raise InputError(f"unreachable ({err.reason})") from None
    except (TimeoutError, socket.timeout):
        raise InputError(f"timed out after {limits.timeout:g} s") from None
    except (OSError, HTTPException) as err:
        raise InputError(f"the download failed ({type(err).__name__}: {err})") from None


def decode_input(
    data: bytes, limits: Limits = Limits(), content_type: str | None = None, size: int = IMAGE_SIZE
) -> np.ndarray:
    """Encoded image bytes to a (size, size, 3) uint8 array with the data module's decoder, else
    ``InputError`` with the reason (naming what a server sent when it was not an image)."""
    try:
        return decode_image(data, max_pixels=limits.max_pixels, size=size)
    except NotAnImage:
        served = f" (the server sent {content_type})" if content_type and not content_type.startswith("image/") else ""
        raise InputError(f"not an image{served}") from None
    except UnreadableImage as err:
        raise InputError(str(err)) from None


def load_input(item: str, limits: Limits = Limits(), size: int = IMAGE_SIZE) -> np.ndarray:
    """A file path or http(s) URL as a (size, size, 3) uint8 array, else ``InputError``."""
    if is_url(item):
        data, ctype = fetch_url(item, limits)
        return decode_input(data, limits, ctype, size)
    path = Path(item).expanduser()
    try:
        nbytes = path.stat().st_size
        if nbytes > limits.max_bytes:
            raise InputError(f"the file has {nbytes:,} bytes, over the limit of {limits.max_bytes:,}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError("no such file") from None
    except OSError as err:
        raise InputError(f"cannot read it ({err.strerror or err})") from None
    return decode_input(data, limits, size=size)


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


def top_k(
    module: ClassifierModule, images: np.ndarray, k: int = 3, temperature: float = 1.0, **kwargs: Any
) -> list[list[tuple[str, float]]]:
    """The ``k`` most likely (class, probability) pairs of each uint8 image (N, 32, 32, 3).

    ``temperature`` divides the logits first (temperature scaling: the same ranking, calibrated
    probabilities; see ``calibration``).
    """
    probs = torch.softmax(predict_logits(module, images, **kwargs) / temperature, dim=1)
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    names = module.class_names
    return [[(names[i], float(p)) for i, p in zip(ix.tolist(), vs.tolist())] for ix, vs in zip(indices, values)]


def predict_inputs(
    module: ClassifierModule,
    items: Sequence[str],
    *,
    k: int = 3,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    limits: Limits = Limits(),
    workers: int = 8,
    temperature: float = 1.0,
) -> Iterator[Prediction]:
    """Predict every image that ``items`` name, in order, ``batch_size`` at a time.

    Inputs are read by ``workers`` threads (downloads wait on the network, PIL releases the GIL
    while decoding). A failed input is yielded with its ``error`` and no prediction.
    """
    entries = expand_inputs(items)
    size = int(module.hparams.get("image_size", IMAGE_SIZE))  # read as the model was trained
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(entries), batch_size):
            chunk = entries[start : start + batch_size]
            todo = [p for p in chunk if p.error is None]
            loaded = []
            for pred, result in zip(todo, pool.map(lambda p: _try_load(p.input, limits, size), todo)):
                if isinstance(result, InputError):
                    pred.error = str(result)
                else:
                    loaded.append((pred, result))
            if loaded:
                images = np.stack([image for _, image in loaded])  # (B, S, S, 3)
                for (pred, _), top in zip(
                    loaded, top_k(module, images, k, temperature, batch_size=batch_size, device=device)
                ):
                    pred.top = top
            yield from chunk


def _try_load(item: str, limits: Limits, size: int = IMAGE_SIZE) -> np.ndarray | InputError:
    try:
        return load_input(item, limits, size)
    except InputError as err:
        return err


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def write_predictions(predictions: Sequence[Prediction], fmt: str, k: int, file: TextIO) -> None:
    """Write the predictions as a rich table (successes only), CSV or JSON (failures with their error)."""
    if fmt == "json":
        file.write(to_json([p.as_dict() for p in predictions]))
    elif fmt == "csv":
        writer = csv.writer(file, lineterminator="\n")
        ranked = [f"{col}_{r}" for r in range(1, k + 1) for col in ("class", "probability")]
        writer.writerow(["input", *ranked, "error"])
        for p in predictions:
            cells = [c for name, prob in p.top for c in (name, f"{prob:.6f}")]
            writer.writerow([p.input, *cells, *[""] * (2 * k - len(cells)), p.error or ""])
    else:
        table = Table(title="Predictions")
        table.add_column("input", overflow="fold")
        for r in range(1, k + 1):
            table.add_column(f"top {r}", justify="right")
        for p in predictions:
            if p.error is None:
                table.add_row(p.input, *[f"{name} {100 * prob:.1f}%" for name, prob in p.top])
        # A file gets a fixed width; the terminal its own.
        Console(file=file, width=None if file is sys.stdout else 120).print(table)


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/predict.py",
        description="Top-k classes of image files, folders (recursive), glob patterns and http(s) URLs.",
        epilog="Exit code: 0 when every input was predicted, 1 when any input failed, 2 on a usage error.",
    )
    parser.add_argument(
        "checkpoint", help="a .ckpt file written by scripts/fit.py, or a network with trained weights (resnet20)"
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder, glob pattern or URL")
    parser.add_argument(
        "--top-k",
        type=positive(int),
        default=3,
        help="classes per input (default: 3); more than the checkpoint has lists all of them",
    )
    parser.add_argument("--format", choices=FORMATS, help="default: from --output's suffix (.csv, .json), else table")
    parser.add_argument("--output", help="write the predictions to this file instead of the terminal")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--calibrated",
        nargs="?",
        const="auto",
        metavar="REPORT",
        help="divide the logits by the temperature of scripts/evaluate.py --calibration (read from REPORT, "
        "default <run dir>/eval/<checkpoint name>/report.json)",
    )
    parser.add_argument("--batch-size", type=positive(int), default=256)
    parser.add_argument("--timeout", type=positive(float), default=DEFAULT_TIMEOUT_S, help="seconds per URL download")
    parser.add_argument("--max-bytes", type=positive(int), default=DEFAULT_MAX_BYTES, help="largest file or download")
    parser.add_argument("--max-pixels", type=positive(int), default=DEFAULT_MAX_PIXELS, help="largest width x height")
    return parser


def calibrated_temperature(checkpoint: str, report: str) -> float:
    """The temperature ``scripts/evaluate.py --calibration`` stored for ``checkpoint``: in ``report``,
    or (``report == "auto"``) in the evaluation folder of the checkpoint."""
    from cifar_lightning.evaluation import default_output_dir

    path = default_output_dir(checkpoint) / "report.json" if report == "auto" else Path(report)
    hint = f"Run python scripts/evaluate.py {checkpoint} --calibration first, or pass --calibrated REPORT.json."
    if not path.is_file():
        raise UserError(
            f"--calibrated needs the evaluation report with a temperature, and {path} does not exist. {hint}"
        )
    try:
        return float(json.loads(path.read_text())["calibration"]["temperature"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} holds no calibration temperature. {hint}") from None


@exit_on_user_error
def predict_main(argv: list[str] | None = None) -> int:
    """``scripts/predict.py``: print or write the predictions; returns the exit code (0 or 1)."""
    from cifar_lightning.checkpoint import load_classifier

    args = predict_parser().parse_args(argv)
    fmt = args.format or _format_from_suffix(args.output)
    device = resolve_device(args.device)
    module = load_classifier(args.checkpoint)
    limits = Limits(args.timeout, args.max_bytes, args.max_pixels)
    k = min(args.top_k, module.hparams.num_classes)  # --top-k 5 of a 3-class model: all 3, as top_k does
    temperature = calibrated_temperature(args.checkpoint, args.calibrated) if args.calibrated else 1.0
    predictions = []
    run = predict_inputs(
        module, args.inputs, k=k, batch_size=args.batch_size, device=device, limits=limits, temperature=temperature
    )
    for pred in run:
        if pred.error:
            print(f"error: {pred.input}: {pred.error}", file=sys.stderr, flush=True)
        predictions.append(pred)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", newline="", encoding="utf-8") as f:
            write_predictions(predictions, fmt, k, f)
    else:
        write_predictions(predictions, fmt, k, sys.stdout)
    failed = sum(p.error is not None for p in predictions)
    if failed:
        print(f"{failed} of {len(predictions)} input(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _format_from_suffix(output: str | None) -> str:
    suffix = Path(output).suffix.lower().lstrip(".") if output else ""
    return suffix if suffix in ("csv", "json") else "table"
