"""Tiny image folders that encode their class, for tests and quick benchmark runs (no real data)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def labelled_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Noise plus a bright channel and a white stripe placed by ``label``: learnable in a few steps.

    (size, size, 3) uint8.
    """
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    img[..., label % 3] += 120
    img[(label * 3) % size : (label * 3) % size + 3, :, :] = 255
    return img


def write_image_folder(
    root: Path,
    classes: Sequence[str] = ("cat", "dog", "frog"),
    n_train: int = 12,
    n_test: int = 4,
    suffix: str = ".png",
    seed: int = 0,
) -> Path:
    """Write ``root/{train,test}/<class>/NNN<suffix>`` with images that encode their class; return ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(labelled_image(label, rng)).save(folder / f"{i:03d}{suffix}")
    return Path(root)
