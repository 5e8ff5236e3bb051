"""Trained weights shipped with the package: the manifest, files named and checked by their sha256,
and the network with its input normalisation inside.

``cifar_lightning/weights/`` is package data, so a clone, ``torch.hub.load`` and a ``pip install``
all hold it. For each network with weights it has one ``<arch>-<sha256 prefix>.pt``, a plain state
dict of tensors (``torch.load(path, weights_only=True)`` reads it), and an entry in ``manifest.json``
that says what the file is (sha256, bytes, storage dtype), how it was made (recipe, commit, data,
seeds, machine) and what it measures (test accuracy over the seeds, and of the shipped seed).

The hash prefix in the name is torch.hub's convention (``load_state_dict_from_url(check_hash=True)``
checks it), so an entry given a ``url`` can be served from a release host. Here the whole sha256 is
checked on every load: a missing, truncated or changed file raises ``WeightsError``, naming the
problem, and nothing is loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from cifar_lightning.data.transforms import normalize
from cifar_lightning.errors import UserError

#: The weights shipped with the package.
PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
#: Environment variable naming another weights folder (its own manifest.json and files).
WEIGHTS_ENV = "CIFAR_LIGHTNING_WEIGHTS"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
#: The manifest's first field: what it is.
MANIFEST_ABOUT = (
    "Trained weights shipped with cifar-lightning: one entry per network, written by scripts/publish_weights.py "
    "(never by hand); docs/weights.md describes each field."
)
#: Hex digits of the sha256 in a weight file's name (torch.hub checks as many as the name holds).
HASH_DIGITS = 10
#: torch.hub's pattern for the hash prefix in a file name (``HASH_REGEX`` in torch/hub.py).
_HUB_HASH = re.compile(r"-([a-f0-9]*)\.")
#: Storage dtypes a weight file may use, by their manifest name.
DTYPES = {"float32": torch.float32, "float16": torch.float16}

_RESTORE = (
    "Restore it (git checkout -- cifar_lightning/weights/ in a clone, or reinstall the package), or publish "
    "the weights again with scripts/publish_weights.py."
)


class WeightsError(UserError):
    """Shipped weights that cannot be used: none for that network, or a file that is missing,
    truncated or changed. Nothing was loaded."""


def weights_dir() -> Path:
    """The weights folder: ``$CIFAR_LIGHTNING_WEIGHTS`` when set, else the package's ``weights/``."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else PACKAGE_WEIGHTS


def _folder(folder: str | os.PathLike | None) -> Path:
    return Path(folder) if folder is not None else weights_dir()


def read_manifest(folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest of ``folder`` (default ``weights_dir()``); an empty one where it has none."""
    path = _folder(folder) / MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "about": MANIFEST_ABOUT, "weights": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"cannot read the weights manifest {path} ({err}). {_RESTORE}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("weights"), dict):
        raise WeightsError(f"{path} is not a weights manifest: it has no 'weights' table. {_RESTORE}")
    return manifest


def list_pretrained(folder: str | os.PathLike | None = None) -> list[str]:
    """The networks that have shipped weights, sorted."""
    return sorted(read_manifest(folder)["weights"])


def weights_entry(name: str, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest entry of ``name``; ``WeightsError`` naming the networks with weights when it has none."""
    weights = read_manifest(folder)["weights"]
    if name in weights:
        return weights[name]
    if weights:
        raise WeightsError(
            f"{name} has no trained weights. Networks with weights: {', '.join(sorted(weights))}. Pick one of "
            f"those, or train {name} yourself (scripts/fit.py --arch {name})."
        )
    raise WeightsError(
        f"{name} has no trained weights: no network has any yet ({_folder(folder) / MANIFEST} lists none). "
        f"Train it yourself (scripts/fit.py --arch {name})."
    )


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 of a file, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_weights_file(path: Path, entry: Mapping[str, Any], name: str) -> None:
    """``WeightsError`` unless ``path`` is the file ``entry`` describes: a name carrying the first
    digits of its sha256 (torch.hub's check), the size, and the whole sha256."""
    expected, size = entry["sha256"], int(entry["bytes"])
    prefix = _HUB_HASH.search(entry["file"])
    if prefix is None or len(prefix.group(1)) < HASH_DIGITS or not expected.startswith(prefix.group(1)):
        raise WeightsError(
            f"the manifest entry of {name} names the file {entry['file']}, whose name does not carry the first "
            f"{HASH_DIGITS} hex digits of its sha256 ({expected[:HASH_DIGITS]}): the manifest was edited by hand. "
            "Publish the weights again with scripts/publish_weights.py."
        )
    if not path.is_file():
        raise WeightsError(f"the weights file of {name} is missing: {path} does not exist. {_RESTORE}")
    actual = path.stat().st_size
    if actual < size:
        raise WeightsError(
            f"the weights file of {name}, {path}, is truncated: {actual:,} of its {size:,} bytes. Nothing was "
            f"loaded. {_RESTORE}"
        )
    digest = sha256_of(path)
    if digest != expected:
        extra = f" and {actual:,} bytes instead of {size:,}" if actual != size else ""
        raise WeightsError(
            f"the weights file of {name}, {path}, was changed: its sha256 is {digest[:16]}... where the manifest "
            f"says {expected[:16]}...{extra}. Nothing was loaded. {_RESTORE}"
        )


def weights_path(name: str, folder: str | os.PathLike | None = None) -> Path:
    """Where the weights of ``name`` are read from: the weights folder, or, for an entry with a
    ``url`` whose file is not there, torch.hub's cache (downloaded once, with its hash prefix checked)."""
    folder = _folder(folder)
    entry = weights_entry(name, folder)
    local = folder / entry["file"]
    if local.is_file() or not entry.get("url"):
        return local
    cached = Path(torch.hub.get_dir()) / "checkpoints" / entry["file"]
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        prefix = _HUB_HASH.search(entry["file"])
        try:
            torch.hub.download_url_to_file(entry["url"], str(cached), prefix and prefix.group(1), progress=False)
        except (OSError, RuntimeError, ValueError) as err:
            raise WeightsError(f"cannot download the weights of {name} from {entry['url']} ({err}).") from None
    return cached


def read_weights(name: str, folder: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The shipped state dict of ``name`` (tensors as stored, fp16 or fp32), read only after
    ``check_weights_file`` has passed; ``WeightsError`` otherwise."""
    entry = weights_entry(name, folder)
    path = weights_path(name, folder)
    check_weights_file(path, entry, name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the sha256 matched, so only a bad publish gets here
        raise WeightsError(f"the weights file of {name}, {path}, cannot be read ({type(err).__name__}).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"the weights file of {name}, {path}, is not a state dict of tensors. {_RESTORE}")
    return state


def load_weights(network: nn.Module, name: str, folder: str | os.PathLike | None = None) -> list[str]:
    """Copy the shipped weights of ``name`` into ``network`` (built by the registry); returns the
    classifier's tensors left as built because ``network`` predicts another number of classes
    (empty when it predicts the weights' own). Every other tensor must fit, else ``WeightsError``."""
    entry = weights_entry(name, folder)
    state, own = read_weights(name, folder), network.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    classes = int(entry["num_classes"])

    def head_only(key: str) -> bool:  # a tensor of the classifier: one row per class, the rest alike
        a, b = state[key].shape, own[key].shape
        return len(a) == len(b) >= 1 and a[0] == classes != b[0] and a[1:] == b[1:]

    other = [k for k in own if k in state and state[k].shape != own[k].shape]
    fresh = [k for k in other if head_only(k)]
    if missing or unexpected or len(fresh) != len(other):
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in other if k not in fresh]
        parts = [("missing", missing), ("unexpected", unexpected), ("other shapes:", shapes)]
        details = "; ".join(f"{label} {', '.join(keys[:4])}" for label, keys in parts if keys)
        raise WeightsError(
            f"the weights of {name} do not fit this network ({details}). Build it with the arguments the weights "
            f"were trained with: {entry.get('arch_kwargs') or 'the defaults'}."
        )
    network.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=not fresh)
    return fresh


def fresh_head_note(name: str, fresh: Sequence[str], weights_classes: int, num_classes: int) -> str:
    """The one line saying that a classifier for another number of classes starts afresh."""
    return (
        f"{name}: the shipped weights predict {weights_classes} classes and this model {num_classes}, so "
        f"{', '.join(fresh)} start afresh; every other layer starts from the weights."
    )


class Normalized(nn.Module):
    """A network that takes images as ``torchvision.transforms.ToTensor()`` gives them, RGB in
    [0, 1] (B, 3, H, W), and normalises them itself with the mean and std it was trained with (as
    RobustBench's models do). ``net`` is the bare network, for inputs normalised elsewhere."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))  # (3,)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(image, self.mean, self.std))


# ---------------------------------------------------------------------------------------------
# Writing a weight file (scripts/publish_weights.py)
# ---------------------------------------------------------------------------------------------


def weights_bytes(state: Mapping[str, torch.Tensor], dtype: str = "float32") -> bytes:
    """The file of a state dict: a plain dict of contiguous CPU tensors, floating ones stored in
    ``dtype``. Saved through memory, so the archive's inner folder is not named after the file, and
    the same tensors always give the same bytes (and so the same name)."""
    cast = DTYPES[dtype]
    plain = {}
    for key, value in state.items():
        value = value.detach().cpu()
        # A copy of its own: torch.save writes a tensor's whole storage, which a view shares with others.
        plain[key] = (value.to(cast) if value.is_floating_point() else value).contiguous().clone()
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    return buffer.getvalue()


def write_weights(
    state: Mapping[str, torch.Tensor], arch: str, folder: str | os.PathLike, dtype: str = "float32"
) -> dict[str, Any]:
    """Write ``state`` as ``<folder>/<arch>-<sha256 prefix>.pt``; returns its manifest fields
    (file, sha256, bytes, dtype). The file appears whole or not at all (written beside, then renamed)."""
    data = weights_bytes(state, dtype)
    digest = hashlib.sha256(data).hexdigest()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{arch}-{digest[:HASH_DIGITS]}.pt"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp's file is private; a weight file is for everyone who can read the package
    os.replace(tmp, folder / name)
    return {"file": name, "sha256": digest, "bytes": len(data), "dtype": dtype}
