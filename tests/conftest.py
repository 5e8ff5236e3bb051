"""Shared fixtures: tiny image folders the tests write themselves, and a subset of the real data."""

from __future__ import annotations

import functools
import os
import tarfile
from pathlib import Path

import pytest

from cifar_lightning.data.synthetic import labelled_image, write_image_folder  # noqa: F401 (shared by the tests)

REPO = Path(__file__).resolve().parents[1]
REAL_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SKIP_NO_ARCHIVE = (
    f"the real CIFAR-10 archive is not at {REAL_ARCHIVE} (it ships beside the project on CI "
    "machines only); these tests read real images from it"
)


#: Networks above this many multiply-accumulates per image are exercised by the slow tests only
#: (CI runs them); the default run still covers every family.
HEAVY_MACS = 8e8


@functools.lru_cache(maxsize=None)
def arch_params() -> list:
    """``list_models()`` as pytest params, the heavy networks marked slow (counted, not listed)."""
    import torch

    from cifar_lightning.models import count_macs, create_model, list_models

    params = []
    for name in list_models():
        with torch.device("meta"):  # shapes only: building and counting cost nothing
            macs = count_macs(create_model(name))
        params.append(pytest.param(name, id=name, marks=[pytest.mark.slow] if macs > HEAVY_MACS else []))
    return params


def pytest_configure(config):
    # Under pytest-xdist, one torch thread per worker: the workers already fill the cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def _recorded_seconds() -> dict[str, float]:
    import json

    try:  # only an order: a file being rewritten (scripts/check_recipes.py) leaves the default one
        rows = json.loads((REPO / "benchmarks" / "recipe_smoke.json").read_text())["results"]
    except (OSError, ValueError, KeyError):
        return {}
    return {row["recipe"]: row["seconds"] for row in rows}


def pytest_collection_modifyitems(config, items):
    # The recipes' short runs first, the longest first (their seconds on one core as last recorded):
    # xdist keeps at most two tests queued on each worker (CI's --maxschedchunk 1), so no long run
    # is left to start last while the other worker waits. The other tests keep their order.
    seconds = _recorded_seconds()

    def key(item) -> float:
        callspec = getattr(item, "callspec", None)
        if getattr(item, "originalname", None) != "test_recipe_learns_in_a_few_steps" or callspec is None:
            return 0.0
        return -seconds.get(callspec.params["recipe"], 1.0)

    items.sort(key=key)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    # Archive extractions and decoded caches of one test never leak into another, or into ~/.cache.
    monkeypatch.setenv("CIFAR_LIGHTNING_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """3 classes, 12 train + 4 test PNG images each."""
    return write_image_folder(tmp_path / "tiny")


@pytest.fixture(scope="session")
def real_subset(tmp_path_factory) -> Path:
    """The first 60 train and 20 test images of each class from the real archive (JPEG copy)."""
    if not REAL_ARCHIVE.is_file():
        pytest.skip(SKIP_NO_ARCHIVE)
    return extract_subset(REAL_ARCHIVE, tmp_path_factory.mktemp("real") / "cifar10", {"train": 60, "test": 20})


@pytest.fixture(scope="session")
def real_cifar10(tmp_path_factory) -> Path:
    """The whole real archive, extracted and decoded once for all test workers of this run."""
    if not REAL_ARCHIVE.is_file():
        pytest.skip(SKIP_NO_ARCHIVE)
    from filelock import FileLock

    from cifar_lightning.data import CIFAR10DataModule

    shared = tmp_path_factory.getbasetemp().parent / "real-cifar10"  # the same folder for every xdist worker
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared) + ".lock"):
        dm = CIFAR10DataModule(data_dir=str(REAL_ARCHIVE), download=False, cache_dir=str(shared))
        dm.prepare_data()  # decodes once into the extracted folder's cache; later readers load it
    return dm.source.root


def extract_subset(archive: Path, dest: Path, per_class: dict[str, int]) -> Path:
    """Copy the first N files of each class and split out of the real archive into ``dest``."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in per_class:
                continue
            key = (parts[0], parts[1])
            if counts.get(key, 0) >= per_class[parts[0]]:
                continue
            counts[key] = counts.get(key, 0) + 1
            target = dest / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return dest


def pytest_report_header(config):
    state = "present" if REAL_ARCHIVE.is_file() else "absent: real-data tests skip"
    return f"real CIFAR-10 archive: {REAL_ARCHIVE} ({state}); cpus: {os.cpu_count()}"
