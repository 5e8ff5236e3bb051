"""Which images of a split validate, and the one fixed order evaluation visits them in."""

from __future__ import annotations

import numpy as np

from cifar_lightning.errors import UserError


def check_val_size(val_size: int | float) -> None:
    """``UserError`` unless ``val_size`` is a count (0, 1, 2, ...) or a fraction strictly between 0 and 1."""
    if val_size < 0 or (val_size >= 1 and not float(val_size).is_integer()):
        raise UserError(
            f"--data.val_size must be a number of images (0 = no validation, e.g. 5000) or a fraction of "
            f"the training split between 0 and 1 (e.g. 0.1), got {val_size}."
        )


def val_count(val_size: int | float, n: int) -> int:
    """Validation images out of ``n`` training-split images: a fraction (0 < v < 1) of ``n``, rounded
    and at least 1, or else ``val_size`` itself as a count."""
    check_val_size(val_size)
    return max(1, round(val_size * n)) if 0 < val_size < 1 else int(val_size)


#: Seed of the one fixed order in which validation and test loaders visit their images.
EVALUATION_ORDER_SEED = 0


def evaluation_order(indices: np.ndarray) -> np.ndarray:
    """``indices`` in one fixed, seeded random order, the same in every run and on every rank.

    Image folders list their files class by class, so the first batches of a split in file order
    are one or two classes: ``limit_val_batches``, ``limit_test_batches`` or ``fast_dev_run`` would
    measure those alone. In this order any prefix is a fair sample, and metrics over the whole split
    are unchanged.
    """
    indices = np.asarray(indices)
    return indices[np.random.default_rng(EVALUATION_ORDER_SEED).permutation(len(indices))]


def split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random (train, val) index split of ``n`` items, ``val_size`` of them for validation,
    each part sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])
