"""The datasets the data module knows by name: what each one's classes, statistics and files are.

``cifar10`` and ``cifar100`` come from torchvision's download (``cifar-10-batches-py/``,
``cifar-100-python/``) or from an image-folder tree with exactly their class names; ``folder`` is
any image-folder tree, whose normalisation is computed from its own training images
(``channel_stats``). With no name given, the data says which one it is (``detect_dataset``).
"""

from __future__ import annotations

import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cifar_lightning.constants import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_CLASSES,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR100_SUPERCLASSES,
)
from cifar_lightning.errors import UserError

DatasetName = Literal["cifar10", "cifar100", "folder"]
DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "folder")


@dataclass(frozen=True)
class Dataset:
    """A named dataset: its torchvision class and folder, class names, superclasses and statistics."""

    name: str
    title: str
    torchvision_class: str
    torchvision_folder: str
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    superclasses: dict[str, tuple[str, ...]] | None = None


KNOWN = {
    "cifar10": Dataset(
        "cifar10", "CIFAR-10", "CIFAR10", "cifar-10-batches-py", CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
    ),
    "cifar100": Dataset(
        "cifar100",
        "CIFAR-100",
        "CIFAR100",
        "cifar-100-python",
        CIFAR100_CLASSES,
        CIFAR100_MEAN,
        CIFAR100_STD,
        CIFAR100_SUPERCLASSES,
    ),
}


def check_dataset_name(name: str | None) -> None:
    """``UserError`` unless ``name`` is None (detect) or one of ``DATASETS``."""
    if name is not None and name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}. Valid names: {', '.join(DATASETS)} (or leave it out to detect it).")


def torchvision_datasets_in(path: Path) -> list[str]:
    """The names of the torchvision datasets whose folders ``path`` holds (torchvision's usual
    ``data/`` can hold both)."""
    return [ds.name for ds in KNOWN.values() if (path / ds.torchvision_folder).is_dir()]


def detect_dataset(class_names: tuple[str, ...]) -> str:
    """An image folder's dataset from its class names: CIFAR-10's or CIFAR-100's exactly, else ``folder``."""
    for ds in KNOWN.values():
        if tuple(class_names) == ds.classes:
            return ds.name
    return "folder"


def check_folder_classes(name: str, class_names: tuple[str, ...], root: Path) -> None:
    """``UserError`` when an image folder's classes are not those of the dataset ``name`` asked for."""
    if name == "folder":
        if len(class_names) < 2:
            raise UserError(
                f"the image folder {root} has {len(class_names)} class folder; a classifier needs at least 2."
            )
        return
    ds = KNOWN[name]
    if tuple(class_names) == ds.classes:
        return
    missing = [c for c in ds.classes if c not in class_names]
    extra = [c for c in class_names if c not in ds.classes]
    raise UserError(
        f"--dataset {name} expects the {len(ds.classes)} class folders of {ds.title}, but {root} has "
        f"{len(class_names)} ({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''}). "
        f"Missing: {', '.join(missing[:5]) or '-'}{' ...' if len(missing) > 5 else ''}; not in {ds.title}: "
        f"{', '.join(extra[:5]) or '-'}{' ...' if len(extra) > 5 else ''}. Pass --dataset folder to train on these classes."
    )


def superclass_table(name: str, class_names: tuple[str, ...]) -> tuple[list[str], list[int]] | None:
    """(superclass names, superclass index of each class) for a dataset with superclasses, else None."""
    groups = KNOWN[name].superclasses if name in KNOWN else None
    if not groups:
        return None
    names = list(groups)
    index = {c: i for i, members in enumerate(groups.values()) for c in members}
    return names, [index[c] for c in class_names]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and population std in [0, 1] over every pixel of uint8 images (N, H, W, 3).

    Exact and cheap in memory: each channel's 256-bin histogram gives both moments, where a float
    copy of CIFAR's 50,000 training images would take 1.2 GB. The same definition as the CIFAR
    constants (all pixels, not the mean of per-image stds).
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(3):
        counts = np.bincount(np.ascontiguousarray(images[..., c]).ravel(), minlength=256).astype(np.float64)
        n = counts.sum()
        m = float(counts @ values / n)
        var = float(counts @ (values - m) ** 2 / n)
        mean.append(round(m, 4))
        std.append(round(max(var, 0.0) ** 0.5, 4))
    return tuple(mean), tuple(std)


def _torchvision_class(name: str):
    import torchvision.datasets as tvd

    return getattr(tvd, KNOWN[name].torchvision_class)


def download(name: str, root: str | os.PathLike, missing_message) -> None:
    """Download dataset ``name`` into ``root`` with torchvision (both splits); ``UserError`` when it fails."""
    cls = _torchvision_class(name)
    root = Path(root)
    # What the download creates is removed when it fails: a mistyped path must not be left behind
    # as an empty folder, nor a partial file in a folder that was there.
    created = next((p for p in [*reversed(root.parents), root] if not p.exists()), None)
    before = set(root.iterdir()) if created is None and root.is_dir() else set()
    try:
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif root.is_dir():
            for new in set(root.iterdir()) - before:
                shutil.rmtree(new, ignore_errors=True) if new.is_dir() else new.unlink(missing_ok=True)
        raise UserError(missing_message(root, f"the download failed: {err}")) from None


def read_torchvision(name: str, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 32, 32, 3), int64 labels (N,)) of one split of a downloaded dataset, read by
    torchvision's own class (CIFAR-100: its fine labels)."""
    ds = _torchvision_class(name)(str(root), train=split == "train", download=False)
    if tuple(ds.classes) != KNOWN[name].classes:
        raise UserError(f"{root / KNOWN[name].torchvision_folder} lists classes other than {KNOWN[name].title}'s.")
    return np.ascontiguousarray(ds.data), np.asarray(ds.targets, dtype=np.int64)


def read_coarse_labels(root: Path, split: str) -> tuple[list[str], np.ndarray]:
    """CIFAR-100's superclass names and each image's superclass (``coarse_labels``), from its files."""
    folder = root / KNOWN["cifar100"].torchvision_folder
    with open(folder / "meta", "rb") as f:
        names = list(pickle.load(f, encoding="latin1")["coarse_label_names"])
    with open(folder / ("train" if split == "train" else "test"), "rb") as f:
        coarse = np.asarray(pickle.load(f, encoding="latin1")["coarse_labels"], dtype=np.int64)
    return names, coarse
