"""CIFAR-10 data: where the images come from, how they are split, and how they are transformed.

Sources, chosen by what ``data_dir`` holds:

1. torchvision's CIFAR-10 format (``cifar-10-batches-py/``), downloaded when ``download=True``;
2. an image-folder tree ``train/<class>/*`` and ``test/<class>/*`` (png/jpg/...);
3. a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` archive of such a tree, extracted once into a cache.

Every source ends up as one uint8 array per split, shape (N, 32, 32, 3), held once in memory
(about 180 MB for all 60,000 images). Workers forked by the DataLoader share those pages, and
images become float only one batch at a time.

Two loaders read those arrays (``CIFAR10DataModule(loader=...)``):

- ``torchvision`` (the default): a ``DataLoader`` over a ``Dataset`` whose items go through
  torchvision transforms one image at a time, in worker processes. Every ``DataLoader`` idiom
  works with it; the tutorial recipes use it.
- ``tensor``: a ``TensorLoader`` that gathers a whole batch of uint8 images with one indexing
  operation and crops, flips and normalises it as one tensor, on the training device (the
  array moves to the GPU once when training runs on one). No workers, no per-image Python. This
  is what airbench (https://github.com/KellerJordan/cifar10-airbench) does to feed a GPU at
  tens of thousands of images per second; ``configs/fastnet.yaml`` and ``scripts/bench.py``
  use it.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tarfile
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cifar_lightning.errors import UserError

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

#: CIFAR-10 label order (index = label), as in the dataset's ``batches.meta``. It is also the
#: alphabetical order, so image folders sorted by name get the same indices.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

#: Per-channel mean and standard deviation of the 50,000 original CIFAR-10 training images,
#: scaled to [0, 1], computed over all pixels of the training split (the std is the population
#: std over every pixel, not the often-copied (0.2023, 0.1994, 0.2010), which averages per-image
#: stds). The JPEG copy gives (0.4913, 0.4821, 0.4465) / (0.2452, 0.2428, 0.2606): close enough
#: that one set of constants serves both.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

IMAGE_SIZE = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
AugmentPreset = Literal["none", "standard", "flip", "translate"]
LoaderKind = Literal["torchvision", "tensor"]
FlipMode = Literal["random", "alternating"]

#: Training augmentation presets: (padding in pixels, padding mode, horizontal flip). A preset
#: pads every side, takes a random crop of the original size, then flips with probability 1/2.
AUGMENT_PRESETS: dict[str, tuple[int, str, bool]] = {
    "none": (0, "constant", False),
    # He et al. 2016 (arXiv:1512.03385), section 4.2: zero-pad 4, random 32x32 crop, flip.
    "standard": (4, "constant", True),
    "flip": (0, "constant", True),
    # airbench94: reflect-pad 2 (translations of at most 2 pixels with no black border), flip.
    "translate": (2, "reflect", True),
}

_TORCHVISION_FOLDER = "cifar-10-batches-py"
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """Where archives are extracted and decoded arrays go when the data folder is read-only."""
    root = os.environ.get("CIFAR_LIGHTNING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cifar_lightning"
    )
    return Path(root)


# ---------------------------------------------------------------------------------------------
# Archives: validated before anything is written, extracted once
# ---------------------------------------------------------------------------------------------


def is_archive(path: str | os.PathLike) -> bool:
    """True when ``path`` names a supported archive file by its suffix."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _check_member_name(archive: Path, name: str) -> None:
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or (parts and (":" in parts[0])) or ".." in parts:
        raise UserError(
            f"archive {archive} contains the entry {name!r}, which would be written outside the "
            "extraction folder; refusing to extract it. Rebuild the archive with relative paths."
        )


def _validate_tar(archive: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()  # reads the whole archive, so a truncated file fails here
    for m in members:
        _check_member_name(archive, m.name)
        if not (m.isfile() or m.isdir()):
            raise UserError(
                f"archive {archive} contains {m.name!r}, which is a link or a special file; "
                "refusing to extract it. Rebuild the archive with regular files only."
            )
    return members


def _validate_zip(archive: Path, zf: zipfile.ZipFile) -> None:
    for info in zf.infolist():
        _check_member_name(archive, info.filename)
        mode = info.external_attr >> 16
        if mode and (mode & 0o170000) not in (0o100000, 0o040000, 0):
            raise UserError(
                f"archive {archive} contains {info.filename!r}, which is a link or a special "
                "file; refusing to extract it. Rebuild the archive with regular files only."
            )
    bad = zf.testzip()
    if bad is not None:
        raise UserError(f"archive {archive} is corrupt: the entry {bad!r} fails its CRC check.")


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract ``archive`` into ``dest`` after checking every entry; return ``dest``.

    Every entry is checked before the first byte is written: absolute paths, ``..`` components,
    links and special files are refused, and so is a truncated or corrupt archive. Extraction
    goes to a temporary folder that is renamed into place, so ``dest`` is either complete or absent.
    """
    archive, dest = Path(archive), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        try:
            if str(archive).lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    _validate_zip(archive, zf)
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive) as tar:
                    members = _validate_tar(archive, tar)
                    tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
            if isinstance(err, OSError) and not isinstance(err, EOFError) and err.errno is not None:
                raise
            raise UserError(
                f"archive {archive} is truncated or corrupt ({type(err).__name__}: {err}). "
                "Download or copy it again."
            ) from None
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _archive_key(archive: Path) -> str:
    st = archive.stat()
    digest = hashlib.sha1(f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{name}-{digest[:12]}"


def extract_archive_cached(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Extract ``archive`` once into ``cache_dir`` (safe under concurrent processes); return the folder."""
    archive = Path(archive)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    dest = root / "extracted" / _archive_key(archive)
    root.mkdir(parents=True, exist_ok=True)
    # The lock makes DDP ranks (or two runs) wait for one extraction instead of racing.
    with FileLock(str(dest) + ".lock"):
        if not dest.is_dir():
            safe_extract(archive, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# Image folders: discovery, decoding and the decoded-array cache
# ---------------------------------------------------------------------------------------------


def _find_split_root(root: Path) -> Path | None:
    """The folder holding ``train/`` and ``test/``: ``root`` itself or one level below it."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    children = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")]
    if len(children) == 1:
        return _find_split_root(children[0]) if children[0] != root else None
    return None


def _list_images(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def folder_class_names(root: Path) -> tuple[str, ...]:
    """Class names of an image-folder tree, checked for agreement between ``train`` and ``test``."""
    names = {}
    for split in ("train", "test"):
        names[split] = sorted(
            d.name for d in (root / split).iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not names[split]:
            raise UserError(
                f"{root / split} has no class folders. Expected {root}/{split}/<class>/<image files>."
            )
    if names["train"] != names["test"]:
        only_train = sorted(set(names["train"]) - set(names["test"]))
        only_test = sorted(set(names["test"]) - set(names["train"]))
        raise UserError(
            f"the train and test class folders under {root} differ: only in train: {only_train or '-'}; "
            f"only in test: {only_test or '-'}. Give both splits the same class folders."
        )
    for split in ("train", "test"):
        for name in names[split]:
            if not _list_images(root / split / name):
                raise UserError(
                    f"the class folder {root / split / name} holds no images "
                    f"({', '.join(IMAGE_SUFFIXES)}). Add images or remove the folder."
                )
    return tuple(names["train"])


def _decode(path: Path) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def decode_image_folder(split_dir: Path, class_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image under ``split_dir/<class>/`` into (N, 32, 32, 3) uint8 and int64 labels.

    Images of another size are resized to 32x32; other modes are converted to RGB. A file that
    cannot be decoded is skipped with a warning that names it, and the count is summarised.
    """
    files, labels = [], []
    for label, name in enumerate(class_names):
        paths = _list_images(split_dir / name)
        files += paths
        labels += [label] * len(paths)
    # PIL releases the GIL while decoding, so threads use every core without copying arrays.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(pool.map(_decode, files, chunksize=256))
    bad = [str(f) for f, img in zip(files, decoded) if img is None]
    for path in bad[:10]:
        warnings.warn(f"skipping {path}: not a readable image", stacklevel=2)
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable file(s) of {len(files)} under {split_dir}", stacklevel=2)
    keep = [i for i, img in enumerate(decoded) if img is not None]
    if not keep:
        raise UserError(f"no readable images under {split_dir}.")
    images = np.stack([decoded[i] for i in keep])
    return images, np.asarray([labels[i] for i in keep], dtype=np.int64)


def _folder_signature(split_dir: Path, class_names: tuple[str, ...]) -> str:
    h = hashlib.sha1(f"v{_CACHE_VERSION}|{','.join(class_names)}".encode())
    for name in class_names:
        for p in _list_images(split_dir / name):
            st = p.stat()
            h.update(f"{p.relative_to(split_dir)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def decoded_cache_dir(split_root: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Cache next to the data when that folder is writable, else under the user cache."""
    if _writable(split_root):
        return split_root / ".cifar_lightning_cache"
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    return base / "decoded" / hashlib.sha1(str(split_root.resolve()).encode()).hexdigest()[:12]


def load_image_folder_split(
    split_root: Path, split: str, class_names: tuple[str, ...], cache_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded arrays of one split, from the cache when it matches the files, else decoded and cached.

    The cache file name carries a signature of every file's path, size and mtime, so a change to
    the images makes the old cache invisible; it is then replaced.
    """
    split_dir = split_root / split
    folder = decoded_cache_dir(split_root, cache_dir)
    sig = _folder_signature(split_dir, class_names)
    path = folder / f"{split}-{sig}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return z["images"], z["labels"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # unreadable cache: decode again below
    images, labels = decode_image_folder(split_dir, class_names)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{split}-*.npz"):
            stale.unlink(missing_ok=True)
        # Written under a temporary name and renamed, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not cache decoded images in {folder}: {err}", stacklevel=2)
    return images, labels


# ---------------------------------------------------------------------------------------------
# Source resolution
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """Where the images come from once ``data_dir`` has been resolved."""

    kind: Literal["torchvision", "folder"]
    root: Path
    class_names: tuple[str, ...]


def _missing_data_message(data_dir: Path, reason: str) -> str:
    return (
        f"no CIFAR-10 data at {data_dir} ({reason}). Either pass --data-dir with an image folder "
        "(train/<class>/*, test/<class>/*) or an archive of one (.tar.gz/.zip), or let torchvision "
        f"download it into {data_dir} with --download on a machine with network access."
    )


def resolve_source(data_dir: str | os.PathLike, download: bool, cache_dir: str | os.PathLike | None = None) -> DataSource:
    """Work out which kind of source ``data_dir`` is, extracting or downloading when needed."""
    path = Path(data_dir).expanduser()
    if path.is_file():
        if not is_archive(path):
            raise UserError(
                f"{path} is a file but not a supported archive ({', '.join(ARCHIVE_SUFFIXES)}). "
                "Pass a folder or an archive of an image-folder tree."
            )
        path = extract_archive_cached(path, cache_dir)
        root = _find_split_root(path)
        if root is None:
            raise UserError(
                f"the archive {data_dir} does not hold train/ and test/ folders at its top level "
                "(or inside one top-level folder). Expected train/<class>/* and test/<class>/*."
            )
        return DataSource("folder", root, folder_class_names(root))
    if path.is_dir():
        if (path / _TORCHVISION_FOLDER).is_dir():
            return DataSource("torchvision", path, CIFAR10_CLASSES)
        root = _find_split_root(path)
        if root is not None:
            return DataSource("folder", root, folder_class_names(root))
    if path.exists() and not path.is_dir():
        raise UserError(_missing_data_message(path, "it is not a folder or an archive"))
    if not download:
        reason = "the folder does not exist" if not path.exists() else (
            "it holds neither cifar-10-batches-py/ nor train/ and test/ folders"
        )
        raise UserError(_missing_data_message(path, reason) + " Download is off.")
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(str(path), train=True, download=True)
        CIFAR10(str(path), train=False, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise UserError(_missing_data_message(path, f"the download failed: {err}")) from None
    return DataSource("torchvision", path, CIFAR10_CLASSES)


def load_split(source: DataSource, split: Literal["train", "test"], cache_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 3), labels int64 (N,)) for one split of a resolved source."""
    if source.kind == "torchvision":
        from torchvision.datasets import CIFAR10

        ds = CIFAR10(str(source.root), train=split == "train", download=False)
        return np.ascontiguousarray(ds.data), np.asarray(ds.targets, dtype=np.int64)
    return load_image_folder_split(source.root, split, source.class_names, cache_dir)


# ---------------------------------------------------------------------------------------------
# Transforms and datasets
# ---------------------------------------------------------------------------------------------


def build_transform(augment: AugmentPreset, mean, std) -> Callable:
    """torchvision transform from a uint8 HWC array to a normalised float (3, 32, 32) tensor.

    ``standard`` is the usual CIFAR augmentation: a random 32x32 crop of the image zero-padded by
    4 pixels on each side, then a horizontal flip with probability 0.5. ``translate`` crops from a
    2-pixel reflect padding instead, ``flip`` only flips (see ``AUGMENT_PRESETS``).
    """
    if augment not in AUGMENT_PRESETS:
        raise UserError(
            f"unknown augmentation preset {augment!r}. Valid presets: {', '.join(AUGMENT_PRESETS)}"
        )
    pad, pad_mode, flip = AUGMENT_PRESETS[augment]
    ops: list = [v2.ToImage()]
    if pad:
        ops.append(v2.RandomCrop(IMAGE_SIZE, padding=pad, padding_mode=pad_mode))
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


class ArrayDataset(Dataset):
    """A view of a shared uint8 image array through an index list: no copy per split or worker."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray | None, transform: Callable):
        self.images = images
        self.labels = labels
        self.indices = np.arange(len(images)) if indices is None else indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        return self.transform(self.images[j]), int(self.labels[j])


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


# ---------------------------------------------------------------------------------------------
# The tensor path: whole batches gathered, augmented and normalised as tensors
# ---------------------------------------------------------------------------------------------


def random_crop_flip(
    images: torch.Tensor,
    pad: int,
    pad_mode: str = "constant",
    flip: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random same-size crops of the padded images, then flips, for a whole batch at once.

    Args:
        images: (B, C, H, W), any dtype and memory layout (uint8 is cheapest).
        pad: pixels of padding on every side; the crop offset is uniform in [0, 2 * pad] per axis.
        pad_mode: ``constant`` (zeros) or ``reflect``, as in ``torch.nn.functional.pad``.
        flip: (B,) bool, which images to mirror left-right; None mirrors none.
        generator: random source of the crop offsets, on the images' device.

    Returns:
        (B, C, H, W), a new tensor.
    """
    b, c, h, w = images.shape
    out = images
    if pad > 0:
        padded = F.pad(images, (pad,) * 4, mode=pad_mode)  # (B, C, H + 2p, W + 2p)
        n = 2 * pad + 1
        sb, sc, sh, sw = padded.stride()
        # crops[i, dy, dx] is the (C, H, W) window of image i at offset (dy, dx): a view of all
        # n * n windows of every image, from which one advanced-indexing gather picks one each.
        crops = padded.as_strided((b, n, n, c, h, w), (sb, sh, sw, sc, sh, sw))
        dy, dx = torch.randint(0, n, (2, b), device=images.device, generator=generator)
        out = crops[torch.arange(b, device=images.device), dy, dx]
    if flip is not None:
        out = torch.where(flip.view(b, 1, 1, 1), out.flip(-1), out)
    return out


def cutout_(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square at a random centre of each image, in place; return it.

    After normalisation zero is the mean colour. The square may extend past the border, as in
    DeVries & Taylor 2017 (arXiv:1708.04552). ``images``: (B, C, H, W) float.
    """
    b, _, h, w = images.shape
    device = images.device
    cy = torch.randint(0, h, (b, 1), device=device, generator=generator) - size // 2
    cx = torch.randint(0, w, (b, 1), device=device, generator=generator) - size // 2
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows >= cy) & (rows < cy + size)  # (B, H)
    in_cols = (cols >= cx) & (cols < cx + size)  # (B, W)
    return images.masked_fill_(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0.0)


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) to normalised float32, contiguous.

    The operations are those of torchvision's ``ToDtype(scale=True)`` and ``Normalize``, in the
    same order, so both loaders give bit-identical images. ``mean``, ``std``: (1, C, 1, 1).
    """
    return images.contiguous().float().mul_(1.0 / 255).sub_(mean).div_(std)


@contextmanager
def _single_threaded(enabled: bool):
    """Run the enclosed CPU tensor operations on one thread, then restore the thread count."""
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _mix_seed(*parts: int) -> int:
    """One well-mixed 63-bit seed from several integers (base seed, rank, epoch, purpose)."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)[0]) >> 1


class EpochShards:
    """Which items one process sees in one epoch, as a tensor of positions.

    For training (``pad=True``) this is ``torch.utils.data.DistributedSampler``'s rule, computed as
    one tensor: every epoch a permutation seeded by ``seed + epoch`` (the same on every rank),
    padded by repeating its start to a multiple of ``num_replicas``, and every
    ``num_replicas``-th item from ``rank`` on. Ranks get disjoint shards of equal length, so they
    take the same number of steps. For evaluation (``pad=False``, no shuffle) nothing is repeated
    and shards may differ by one item, as with Lightning's ``UnrepeatedDistributedSampler``.
    """

    def __init__(
        self, n: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, pad: bool = True, seed: int = 0
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.shuffle, self.pad, self.seed = shuffle, pad, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every training epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.num_replicas)
        return len(range(self.rank, self.n, self.num_replicas))

    def positions(self, epoch: int | None = None) -> torch.Tensor:
        """int64 positions in [0, n) for this rank and ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.n)
        if self.pad:
            total = len(self) * self.num_replicas
            order = order.repeat(math.ceil(total / self.n))[:total]
        return order[self.rank :: self.num_replicas]

    def __iter__(self):
        return iter(self.positions().tolist())


class TensorLoader:
    """Batches of a uint8 image array, gathered, augmented and normalised as whole tensors.

    An iterable with a length, which Lightning accepts wherever it accepts a ``DataLoader``: it
    calls ``sampler.set_epoch`` every epoch and sizes schedules from ``len(loader)``. Batches come
    out as ``(images, labels)``: float32 (B, 3, H, W) normalised, int64 (B,), on ``device``.

    Args:
        images: uint8 (N, H, W, 3), the whole array of a split file; on ``device`` or on the CPU
            (then each uint8 batch is copied to ``device`` before it is augmented).
        labels: int64 (N,), on the same device as ``images``.
        indices: int64 positions in ``images`` that make up this split (train or validation).
        batch_size: images per batch (per process).
        train: shuffle, shard with padding and augment; else keep the order and do not augment.
        augment: a preset of ``AUGMENT_PRESETS``. flip_mode: ``random`` flips each image with
            probability 1/2; ``alternating`` flips a fixed random half of the images in even
            epochs and the other half in odd ones (airbench's alternating flip, arXiv:2404.00498).
        cutout: side of the square zeroed in each training image after normalisation; 0 = off.
        mean, std: per-channel normalisation, 0-1 scale.
        device: where batches are made. num_replicas, rank: the process's place under DDP.
        seed: base seed, the same on every rank: the shuffle order comes from it, and augmentation
            from it mixed with the rank and the epoch, so ranks augment differently and a resumed
            run repeats the epochs it resumes.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        augment: AugmentPreset = "none",
        flip_mode: FlipMode = "random",
        cutout: int = 0,
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
        device: torch.device | str = "cpu",
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        self.images, self.labels = images, labels
        self.indices = torch.as_tensor(indices, dtype=torch.long).to(images.device)
        self.batch_size = batch_size
        self.train = train
        self.augment, self.flip_mode, self.cutout = augment, flip_mode, cutout
        self.device = torch.device(device)
        self.rank, self.seed = rank, seed
        self.sampler = EpochShards(len(self.indices), num_replicas, rank, shuffle=train, pad=train, seed=seed)
        self.batch_sampler = None  # batches are cut here; Lightning reads both attributes
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.flip_parity = None
        if train and flip_mode == "alternating":
            # One fixed bit per image, the same on every rank: an image flips when its bit
            # differs from the epoch's parity, so it is seen both ways in any two epochs.
            g = torch.Generator().manual_seed(_mix_seed(seed, 2))
            self.flip_parity = torch.randint(0, 2, (len(images),), generator=g).bool().to(images.device)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        # A generator: nothing runs until the first batch is asked for, so a set_epoch() call
        # made after iter() (as Lightning does) still counts.
        epoch = self.sampler.epoch
        self.sampler.set_epoch(epoch + 1)  # a plain loop without set_epoch() still reshuffles
        order = self.indices[self.sampler.positions(epoch).to(self.indices.device)]
        generator = torch.Generator(device=self.device).manual_seed(_mix_seed(self.seed, self.rank, epoch, 1))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            # On a CPU a batch is a handful of small, memory-bound operations: a second OpenMP
            # thread gains little, and when the cores are shared with other processes each
            # operation waits for the slower thread (3-4x slower than one thread, measured on a
            # loaded 2-core machine). The model's convolutions keep every thread.
            with _single_threaded(self.device.type == "cpu"):
                x = self.images.index_select(0, idx).to(self.device, non_blocking=True)  # (B, H, W, 3)
                y = self.labels.index_select(0, idx).to(self.device, non_blocking=True)
                x = self.make_batch(x.permute(0, 3, 1, 2), idx, epoch, generator)
            yield x, y

    def make_batch(
        self, images: torch.Tensor, idx: torch.Tensor, epoch: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """uint8 (B, 3, H, W) of array positions ``idx`` to the normalised float batch."""
        if self.train:
            pad, pad_mode, flip = AUGMENT_PRESETS[self.augment]
            flips = None
            if flip and self.flip_parity is not None:
                flips = self.flip_parity[idx].to(self.device) ^ bool(epoch % 2)
            elif flip:
                flips = torch.rand(len(images), device=self.device, generator=generator) < 0.5
            images = random_crop_flip(images, pad, pad_mode, flips, generator)
        x = normalize_uint8(images, self.mean, self.std)
        if self.train and self.cutout > 0:
            cutout_(x, self.cutout, generator)
        return x


# ---------------------------------------------------------------------------------------------
# The DataModule
# ---------------------------------------------------------------------------------------------


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 (or any image-folder dataset of 32x32 images) for Lightning.

    Args:
        data_dir: a folder in torchvision's CIFAR-10 format, an image-folder tree
            (``train/<class>/*``, ``test/<class>/*``) or an archive of one.
        download: download CIFAR-10 with torchvision when ``data_dir`` holds no data.
        cache_dir: where archives are extracted and decoded arrays cached when the data folder is
            read-only (default ``$CIFAR_LIGHTNING_CACHE`` or ``~/.cache/cifar_lightning``).
        val_size: training images held out for validation (model selection), never the test set:
            a count (5000) or a fraction of the training split strictly between 0 and 1 (0.1, the
            default: 5,000 of CIFAR-10's 50,000). 0 trains on the whole training split with no
            validation (a final run once the settings are chosen); the run then keeps its last
            epoch instead of its best.
        split_seed: seed of the train/validation split, independent of the training seed.
        batch_size: images per batch (per device under DDP).
        augment: training augmentation preset: ``none``, ``standard`` (zero-pad 4, random crop,
            flip), ``flip`` or ``translate`` (reflect-pad 2, random crop, flip).
        normalize: subtract ``mean`` and divide by ``std``; off gives plain [0, 1] tensors.
        mean, std: per-channel normalisation constants (default: CIFAR-10 training set).
        num_workers, pin_memory, persistent_workers: DataLoader settings (``torchvision`` loader).
        loader: ``torchvision`` (default: a DataLoader with per-image transforms in workers) or
            ``tensor`` (whole batches augmented as tensors on the training device; batches are
            finished inside the loader, so ``num_workers`` and ``pin_memory`` do not apply).
        flip_mode: ``random`` or ``alternating`` (``tensor`` loader only; see ``TensorLoader``).
        cutout: side in pixels of a square zeroed in each training image, 0 = off (``tensor``
            loader only).
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        cache_dir: str | None = None,
        val_size: int | float = 0.1,
        split_seed: int = 0,
        batch_size: int = 128,
        augment: AugmentPreset = "standard",
        normalize: bool = True,
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        loader: LoaderKind = "torchvision",
        flip_mode: FlipMode = "random",
        cutout: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise UserError(f"batch_size must be positive, got {batch_size}. Pass e.g. --batch-size 128.")
        check_val_size(val_size)
        if num_workers < 0:
            raise UserError(f"num_workers must be 0 or more, got {num_workers}.")
        if any(s <= 0 for s in std):
            raise UserError(f"std must be positive in every channel, got {tuple(std)}.")
        build_transform(augment, mean, std)  # validates the preset name now, not mid-fit
        if loader not in ("torchvision", "tensor"):
            raise UserError(f"unknown loader {loader!r}. Valid names: torchvision, tensor")
        if flip_mode not in ("random", "alternating"):
            raise UserError(f"unknown flip_mode {flip_mode!r}. Valid names: random, alternating")
        if cutout < 0:
            raise UserError(f"cutout must be 0 (off) or a size in pixels, got {cutout}.")
        if loader == "torchvision" and (flip_mode != "random" or cutout):
            raise UserError(
                "flip_mode 'alternating' and cutout need the tensor loader: pass --data.loader tensor."
            )
        self.save_hyperparameters()
        self.source = resolve_source(data_dir, download, cache_dir)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.predict_set: Dataset | None = None
        self._device_arrays: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    # Attributes linked into the model, so the checkpoint knows what the data looked like.
    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.source.class_names)

    @property
    def norm_mean(self) -> tuple[float, float, float]:
        return tuple(self.hparams.mean) if self.hparams.normalize else (0.0, 0.0, 0.0)

    @property
    def norm_std(self) -> tuple[float, float, float]:
        return tuple(self.hparams.std) if self.hparams.normalize else (1.0, 1.0, 1.0)

    def prepare_data(self) -> None:
        # Runs on one process per node before setup(): decode once so other ranks read the cache.
        if self.source.kind == "folder":
            for split in ("train", "test"):
                load_split(self.source, split, self.hparams.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        eval_tf = build_transform("none", self.norm_mean, self.norm_std)
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = load_split(self.source, "train", self.hparams.cache_dir)
            n_val = val_count(self.hparams.val_size, len(images))
            if n_val >= len(images):
                raise UserError(
                    f"--data.val_size {self.hparams.val_size} holds out {n_val} images for validation, which "
                    f"leaves none of the {len(images)} training-split images for training. Pass a smaller "
                    "count or a fraction such as --data.val_size 0.1."
                )
            train_idx, val_idx = split_indices(len(images), n_val, self.hparams.split_seed)
            train_tf = build_transform(self.hparams.augment, self.norm_mean, self.norm_std)
            self.train_set = ArrayDataset(images, labels, train_idx, train_tf)
            self.val_set = ArrayDataset(images, labels, evaluation_order(val_idx), eval_tf) if len(val_idx) else None
        if stage in (None, "test", "predict") and self.test_set is None:
            images, labels = load_split(self.source, "test", self.hparams.cache_dir)
            self.test_set = ArrayDataset(images, labels, evaluation_order(np.arange(len(images))), eval_tf)
            # trainer.predict returns its outputs in file order, so they line up with the files.
            self.predict_set = ArrayDataset(images, labels, None, eval_tf)

    def split_arrays(self, split: Literal["val", "test"]) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images (N, 32, 32, 3), int64 labels (N,)) of the validation or test split, in file
        order (the loaders visit them in ``evaluation_order``)."""
        self.setup("fit" if split == "val" else "test")
        ds = self.val_set if split == "val" else self.test_set
        if ds is None:
            raise UserError("there is no validation split: --data.val_size is 0.")
        idx = np.sort(ds.indices)
        return ds.images[idx], np.asarray(ds.labels)[idx]

    def sample_train_images(self, n: int) -> torch.Tensor:
        """The first ``n`` training-split images, normalised, without augmentation: (n, 3, 32, 32).

        Deterministic, so every DDP rank gets the same images (used for data-dependent init).
        """
        if self.train_set is None:
            self.setup("fit")
        ds = self.train_set
        idx = ds.indices[: min(n, len(ds))]
        x = torch.from_numpy(ds.images[idx]).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(self.norm_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.norm_std).view(1, 3, 1, 1)
        return (x - mean) / std

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader | TensorLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if self.hparams.loader == "tensor":
            return self._tensor_loader(dataset, train)
        sampler = None
        trainer = self.trainer
        if not train and trainer is not None and trainer.world_size > 1:
            # Lightning's default DistributedSampler pads the last batch with repeated samples,
            # which would count them twice in validation/test metrics. This sampler does not.
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.hparams.persistent_workers and workers > 0,
            drop_last=False,
        )

    def _tensor_loader(self, dataset: ArrayDataset, train: bool) -> TensorLoader:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        world_size = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        images, labels = self._arrays_on(dataset, device)
        # The shuffle seed must agree between ranks: Lightning's global seed (what it gives its own
        # DistributedSampler), else 0 under DDP, else this process's torch seed.
        seed = os.environ.get("PL_GLOBAL_SEED")
        seed = int(seed) if seed is not None else (0 if world_size > 1 else torch.initial_seed())
        return TensorLoader(
            images,
            labels,
            torch.from_numpy(np.asarray(dataset.indices, dtype=np.int64)),
            self.hparams.batch_size,
            train=train,
            augment=self.hparams.augment if train else "none",
            flip_mode=self.hparams.flip_mode,
            cutout=self.hparams.cutout if train else 0,
            mean=self.norm_mean,
            std=self.norm_std,
            device=device,
            num_replicas=world_size,
            rank=rank,
            seed=seed,
        )

    def _arrays_on(self, dataset: ArrayDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A split file's whole image and label arrays as tensors, moved once to a GPU ``device``.

        On the CPU the tensors share the numpy arrays' memory. A GPU copy is made when the array
        takes at most a quarter of the free GPU memory (CIFAR-10's training file: 150 MB), and
        then shared by the training and validation loaders; otherwise batches are copied over
        one at a time.
        """
        key = (id(dataset.images), str(device))
        if key not in self._device_arrays:
            images = torch.from_numpy(dataset.images)
            labels = torch.from_numpy(np.asarray(dataset.labels, dtype=np.int64))
            if device.type == "cuda" and images.nbytes <= torch.cuda.mem_get_info(device)[0] // 4:
                images, labels = images.to(device), labels.to(device)
            self._device_arrays[key] = (images, labels)
        return self._device_arrays[key]

    def train_dataloader(self) -> DataLoader | TensorLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | TensorLoader | list:
        if self.hparams.val_size == 0:
            # No validation asked for: Lightning skips the loop, and its note about an empty
            # loader list would only repeat that.
            warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
            return []
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader | TensorLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader | TensorLoader:
        return self._loader(self.predict_set, train=False)
