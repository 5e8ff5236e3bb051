"""Archives of an image-folder tree: every entry checked before anything is written, extracted once."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock

from cifar_lightning.constants import ARCHIVE_SUFFIXES
from cifar_lightning.errors import UserError


def default_cache_dir() -> Path:
    """Where archives are extracted and decoded arrays go when the data folder is read-only."""
    root = os.environ.get("CIFAR_LIGHTNING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cifar_lightning"
    )
    return Path(root)


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
                f"archive {archive} is truncated or corrupt ({type(err).__name__}: {err}). Download or copy it again."
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
