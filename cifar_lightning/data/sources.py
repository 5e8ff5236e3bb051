"""Where the images come from, and the one decoder that turns an image file into a CIFAR array.

Sources, chosen by what ``data_dir`` holds:

1. torchvision's CIFAR-10 or CIFAR-100 format (``cifar-10-batches-py/``, ``cifar-100-python/``;
   ``datasets.py``), downloaded by ``download_dataset`` when asked (the data module calls it from
   ``prepare_data``: once per node, never from a constructor);
2. an image-folder tree ``train/<class>/*`` and ``test/<class>/*`` (png/jpg/...);
3. an archive of such a tree (``archives.py``), extracted once into a cache.

Every source ends up as one uint8 array per split, shape (N, S, S, 3), S = 32 unless the data module
is given another ``image_size``. Image folders are decoded once, by threads, and cached as ``.npz``
keyed by every file's name, size and modification time, and by S.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cifar_lightning.constants import ARCHIVE_SUFFIXES, IMAGE_SIZE, IMAGE_SUFFIXES
from cifar_lightning.data import datasets
from cifar_lightning.data.archives import default_cache_dir, extract_archive_cached, is_archive
from cifar_lightning.errors import UserError

#: Part of the decoded cache's key: a change to the decoder makes older caches invisible.
#: 2: EXIF orientation applied (as prediction always did).
_CACHE_VERSION = 2

# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------


class UnreadableImage(Exception):
    """An image file that cannot be decoded; the message says why."""


class NotAnImage(UnreadableImage):
    """Bytes that no image format recognises."""


def decode_image(
    source: bytes | str | os.PathLike, max_pixels: int | None = None, size: int = IMAGE_SIZE
) -> np.ndarray:
    """An image file (path or bytes) as (size, size, 3) uint8 RGB; ``UnreadableImage`` with the reason.

    The one decoder of the project: image folders for training and evaluation, and prediction,
    all go through it. The EXIF orientation is applied (phone photos store their rotation there),
    other modes (grey, palette, RGBA) are converted to RGB, and other sizes are resized to
    ``size`` x ``size`` bilinearly (``resize``). ``max_pixels`` refuses larger images from their
    header, before decoding.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise UnreadableImage(f"the image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
            return resize(ImageOps.exif_transpose(img).convert("RGB"), size)
    except Image.DecompressionBombError as err:
        raise UnreadableImage(f"the image is too large to decode safely ({err})") from None
    except UnidentifiedImageError:
        raise NotAnImage("not an image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImage(f"truncated or corrupt image ({err})") from None


def resize(img, size: int) -> np.ndarray:
    """An RGB PIL image (or a uint8 HWC array) as a (size, size, 3) uint8 array: PIL's bilinear
    resize, the decoder's, so arrays and files of one size end up alike."""
    from PIL import Image

    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(img, dtype=np.uint8)


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images (N, H, W, 3) as (N, size, size, 3), each by ``resize``; the array itself when
    it already has that size."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([resize(img, size) for img in images])


def _decode_or_none(path: Path, size: int = IMAGE_SIZE) -> np.ndarray | None:
    try:
        return decode_image(path, size=size)
    except UnreadableImage:
        return None


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


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, by suffix), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def folder_class_names(root: Path) -> tuple[str, ...]:
    """Class names of an image-folder tree, checked for agreement between ``train`` and ``test``."""
    names = {}
    for split in ("train", "test"):
        names[split] = sorted(d.name for d in (root / split).iterdir() if d.is_dir() and not d.name.startswith("."))
        if not names[split]:
            raise UserError(f"{root / split} has no class folders. Expected {root}/{split}/<class>/<image files>.")
    if names["train"] != names["test"]:
        only_train = sorted(set(names["train"]) - set(names["test"]))
        only_test = sorted(set(names["test"]) - set(names["train"]))
        raise UserError(
            f"the train and test class folders under {root} differ: only in train: {only_train or '-'}; "
            f"only in test: {only_test or '-'}. Give both splits the same class folders."
        )
    for split in ("train", "test"):
        for name in names[split]:
            if not list_images(root / split / name):
                raise UserError(
                    f"the class folder {root / split / name} holds no images "
                    f"({', '.join(IMAGE_SUFFIXES)}). Add images or remove the folder."
                )
    return tuple(names["train"])


def decode_image_folder(
    split_dir: Path, class_names: tuple[str, ...], size: int = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image under ``split_dir/<class>/`` into (N, size, size, 3) uint8 and int64 labels.

    A file that cannot be decoded is skipped with a warning that names it, and the count is
    summarised.
    """
    files, labels = [], []
    for label, name in enumerate(class_names):
        paths = list_images(split_dir / name)
        files += paths
        labels += [label] * len(paths)
    # PIL releases the GIL while decoding, so threads use every core without copying arrays.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(pool.map(_decode_or_none, files, [size] * len(files), chunksize=256))
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


def _folder_signature(split_dir: Path, class_names: tuple[str, ...], size: int = IMAGE_SIZE) -> str:
    sized = "" if size == IMAGE_SIZE else f"|{size}px"  # as _cache_name: 32 keeps the older key
    h = hashlib.sha1(f"v{_CACHE_VERSION}|{','.join(class_names)}{sized}".encode())
    for name in class_names:
        for p in list_images(split_dir / name):
            st = p.stat()
            h.update(f"{p.relative_to(split_dir)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def decoded_cache_dir(split_root: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Cache next to the data when that folder is writable, else under the user cache."""
    if os.access(split_root, os.W_OK):
        return split_root / ".cifar_lightning_cache"
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    return base / "decoded" / hashlib.sha1(str(split_root.resolve()).encode()).hexdigest()[:12]


def load_image_folder_split(
    split_root: Path,
    split: str,
    class_names: tuple[str, ...],
    cache_dir: str | os.PathLike | None = None,
    size: int = IMAGE_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded arrays of one split, from the cache when it matches the files, else decoded and cached.

    The cache file name carries a signature of every file's path, size and mtime, so a change to
    the images makes the old cache invisible; it is then replaced. Processes that find no cache at
    the same time (every rank of a torchrun job builds its data module) take turns on a file
    lock: one decodes, the others then read what it wrote.
    """
    return _load_cached(
        split_root, split, class_names, _cache_path(split_root, split, class_names, cache_dir, size), size
    )


def _cache_path(split_root: Path, split: str, class_names: tuple[str, ...], cache_dir, size: int) -> Path:
    """Where one split's decoded arrays are cached: its name carries the files' signature."""
    folder = decoded_cache_dir(split_root, cache_dir)
    return folder / _cache_name(split, _folder_signature(split_root / split, class_names, size), size)


def _load_cached(
    split_root: Path, split: str, class_names: tuple[str, ...], path: Path, size: int
) -> tuple[np.ndarray, np.ndarray]:
    split_dir, folder = split_root / split, path.parent
    cached = _read_cache(path)
    if cached is not None:
        return cached
    with _decode_lock(folder, split, size):
        cached = _read_cache(path)  # decoded by another process while this one waited
        if cached is not None:
            return cached
        return _decode_and_cache(split, split_dir, class_names, size, folder, path)


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return z["images"], z["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # unreadable cache: decoded again


def _decode_lock(folder: Path, split: str, size: int):
    """A lock on decoding one split at one size into ``folder``; none where it cannot be created."""
    import contextlib

    from filelock import FileLock

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return contextlib.nullcontext()  # no cache either: _decode_and_cache warns
    if not os.access(folder, os.W_OK):  # a shared, read-only cache: nothing to write, nothing to lock
        return contextlib.nullcontext()
    return FileLock(str(folder / f".{split}-{size}px.lock"))


def _decode_and_cache(
    split: str, split_dir: Path, class_names: tuple[str, ...], size: int, folder: Path, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = decode_image_folder(split_dir, class_names, size)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Older caches of this split at this size go; never this name, which another process
        # reading the same folder may just have written, nor other sizes' caches.
        for stale in folder.glob(f"{split}-*"):
            if stale.name.split(".")[0] != path.stem and _cache_size(split, stale.name) == size:
                stale.unlink(missing_ok=True)
        # Written under a temporary name and renamed, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels)
        os.replace(tmp, path)
        _write_stats(path, images)
    except OSError as err:
        warnings.warn(f"could not cache decoded images in {folder}: {err}", stacklevel=2)
    return images, labels


def _cache_name(split: str, signature: str, size: int) -> str:
    # The size is in the name only when it is not CIFAR's 32, so caches made before it still count.
    return f"{split}-{signature}.npz" if size == IMAGE_SIZE else f"{split}-{size}px-{signature}.npz"


def _cache_size(split: str, name: str) -> int:
    """The image size of a cache file named by ``_cache_name``."""
    middle = name[len(split) + 1 :].split("-")[0]
    return int(middle[:-2]) if middle.endswith("px") and middle[:-2].isdigit() else IMAGE_SIZE


def _write_stats(npz: Path, images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = datasets.channel_stats(images)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=npz.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({"mean": mean, "std": std, "images": len(images)}, f)
    os.replace(tmp, npz.with_suffix(".stats.json"))
    return mean, std


def _read_stats(npz: Path) -> tuple | None:
    """The statistics saved beside a decoded split; None before they are computed (or for a cache
    from before they were kept)."""
    try:
        stats = json.loads(npz.with_suffix(".stats.json").read_text())
        return tuple(stats["mean"]), tuple(stats["std"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def image_folder_stats(
    split_root: Path, class_names: tuple[str, ...], cache_dir: str | os.PathLike | None = None, size: int = IMAGE_SIZE
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of an image folder's whole ``train/`` split (``datasets.channel_stats``).

    Computed on first use, when the split is decoded, and cached beside its decoded arrays under
    the same signature, so a change to the images recomputes them. The validation slice is part
    of that split: the figures describe the training files, as CIFAR's own constants do.
    """
    npz = _cache_path(split_root, "train", class_names, cache_dir, size)  # one walk of the files
    if (found := _read_stats(npz)) is not None:
        return found
    images, _ = _load_cached(split_root, "train", class_names, npz, size)
    if (found := _read_stats(npz)) is not None:  # decoded just now, and computed with the arrays
        return found
    try:
        return _write_stats(npz, images)
    except OSError:  # a read-only cache: computed on every use
        return datasets.channel_stats(images)


# ---------------------------------------------------------------------------------------------
# Source resolution and download
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """Where the images come from once ``data_dir`` has been resolved.

    ``dataset``: which named dataset it is (``datasets.DATASETS``). ``needs_download``: a
    torchvision source that is not on disk yet (``download_dataset`` fetches it).
    """

    kind: Literal["torchvision", "folder"]
    root: Path
    class_names: tuple[str, ...]
    needs_download: bool = False
    dataset: str = "cifar10"


def _missing_data_message(data_dir: Path, reason: str, dataset: str = "cifar10") -> str:
    if dataset == "folder":
        return (
            f"no image folder at {data_dir} ({reason}). --dataset folder reads your own images: pass --data-dir "
            "with train/<class>/* and test/<class>/* folders, or an archive of them (.tar.gz/.zip)."
        )
    title = datasets.KNOWN[dataset].title
    return (
        f"no {title} data at {data_dir} ({reason}). Either pass --data-dir with an image folder "
        "(train/<class>/*, test/<class>/*) or an archive of one (.tar.gz/.zip), or let torchvision "
        f"download {title} into {data_dir} with --download on a machine with network access."
    )


def _missing_archive_message(path: Path) -> str:
    """An archive path that does not exist: the archives its folder does hold, if any. It is never
    a folder to download into."""
    folder = path.parent
    if not folder.is_dir():
        return f"archive {path} not found: its folder {folder} does not exist either. Pass the path of an existing archive or folder with --data-dir."
    found = sorted(p.name for p in folder.iterdir() if p.is_file() and is_archive(p))
    hint = (
        f" {folder} holds: {', '.join(found)}."
        if found
        else f" {folder} holds no archive ({', '.join(ARCHIVE_SUFFIXES)})."
    )
    return f"archive {path} not found.{hint} Pass the path of an existing archive or folder with --data-dir."


def _folder_source(root: Path, dataset: str | None) -> DataSource:
    names = folder_class_names(root)
    if dataset is None:
        dataset = datasets.detect_dataset(names)
    datasets.check_folder_classes(dataset, names, root)
    return DataSource("folder", root, names, dataset=dataset)


def resolve_source(
    data_dir: str | os.PathLike, download: bool, cache_dir: str | os.PathLike | None = None, dataset: str | None = None
) -> DataSource:
    """Work out which kind of source ``data_dir`` is (extracting an archive once); downloads nothing.

    ``dataset`` (``datasets.DATASETS``) says what the data must be; None takes what it is: a
    torchvision folder's dataset, an image folder with CIFAR-10's or CIFAR-100's exact class
    names as that dataset, any other image folder as ``folder``, and nothing as CIFAR-10 to
    download. Missing data is a ``UserError`` at once when ``download`` is off; with it on, the
    source is marked ``needs_download`` and ``download_dataset`` fetches it later.
    """
    datasets.check_dataset_name(dataset)
    path = Path(data_dir).expanduser()
    if is_archive(path) and not path.exists():
        raise UserError(_missing_archive_message(path))
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
        return _folder_source(root, dataset)
    if path.is_dir():
        present = datasets.torchvision_datasets_in(path)
        if dataset is None and len(present) > 1:
            raise UserError(
                f"{path} holds both {' and '.join(datasets.KNOWN[n].torchvision_folder for n in present)}: "
                f"say which to read with --dataset {' or --dataset '.join(present)}."
            )
        found = dataset if dataset in present else (present[0] if present and dataset is None else None)
        if found is not None:
            return DataSource("torchvision", path, datasets.KNOWN[found].classes, dataset=found)
        found = present[0] if present else None
        wanted = dataset or "cifar10"
        root = _find_split_root(path)
        if root is not None:
            return _folder_source(root, dataset)
        if found is not None and wanted != "folder" and not download:
            raise UserError(
                f"{path} holds {datasets.KNOWN[found].title} ({datasets.KNOWN[found].torchvision_folder}/), not "
                f"{datasets.KNOWN[wanted].title}. Pass --dataset {found}, or --download to fetch {datasets.KNOWN[wanted].title} beside it."
            )
    wanted = dataset or "cifar10"
    if path.exists() and not path.is_dir():
        raise UserError(_missing_data_message(path, "it is not a folder or an archive", wanted))
    if not download or wanted == "folder":
        reason = (
            "the folder does not exist"
            if not path.exists()
            else (
                "it holds no train/ and test/ folders"
                if wanted == "folder"
                else f"it holds neither {datasets.KNOWN[wanted].torchvision_folder}/ nor train/ and test/ folders"
            )
        )
        raise UserError(
            _missing_data_message(path, reason, wanted) + ("" if wanted == "folder" else " Download is off.")
        )
    return DataSource("torchvision", path, datasets.KNOWN[wanted].classes, needs_download=True, dataset=wanted)


def download_dataset(source: DataSource) -> None:
    """Download ``source``'s dataset into its root with torchvision (both splits); ``UserError`` when it fails."""
    datasets.download(source.dataset, source.root, lambda root, why: _missing_data_message(root, why, source.dataset))


def load_split(
    source: DataSource, split: Literal["train", "test"], cache_dir=None, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, size, size, 3), labels int64 (N,)) for one split of a resolved source."""
    if source.kind == "torchvision":
        images, labels = datasets.read_torchvision(source.dataset, source.root, split)
        return resize_all(images, size), labels
    return load_image_folder_split(source.root, split, source.class_names, cache_dir, size)
