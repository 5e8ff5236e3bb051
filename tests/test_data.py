"""CIFAR10DataModule: every source, the split, the transforms and the caches."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

from cifar_lightning.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10DataModule,
    archives,
    load_image_folder_split,
    safe_extract,
    sources,
)
from cifar_lightning.errors import UserError


def make_dm(data_dir, **kw) -> CIFAR10DataModule:
    kw.setdefault("val_size", 6)
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 4)
    return CIFAR10DataModule(data_dir=str(data_dir), download=False, **kw)


def test_image_folder_shapes_split_and_labels(tiny_folder):
    dm = make_dm(tiny_folder)
    assert dm.class_names == ["cat", "dog", "frog"]  # alphabetical = label order
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 6, 12)
    # validation comes out of the training split, disjoint from what is trained on
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert dm.train_set.images.dtype == np.uint8 and dm.train_set.images.shape[1:] == (32, 32, 3)
    # the label of each test image is the class folder it came from: brightest channel = label % 3
    for i in range(len(dm.test_set)):
        img = dm.test_set.images[dm.test_set.indices[i]].astype(float)
        assert img.reshape(-1, 3).mean(0).argmax() == dm.test_set.labels[dm.test_set.indices[i]] % 3


def test_split_is_seeded(tiny_folder):
    a, b, c = (make_dm(tiny_folder, split_seed=s) for s in (1, 1, 2))
    for dm in (a, b, c):
        dm.setup("fit")
    assert np.array_equal(a.val_set.indices, b.val_set.indices)
    assert not np.array_equal(a.val_set.indices, c.val_set.indices)


def test_normalization_and_eval_transform(tiny_folder):
    dm = make_dm(tiny_folder, augment="none")
    dm.setup("test")
    x, _ = dm.test_set[0]
    first = dm.test_set.indices[0]  # the loaders' first image (evaluation_order), not the first file
    raw = torch.from_numpy(dm.test_set.images[first]).permute(2, 0, 1).float() / 255
    # A folder of its own classes is normalised with its own training images' statistics.
    train = load_image_folder_split(dm.source.root, "train", dm.source.class_names)[0] / 255.0
    assert dm.dataset_name == "folder"
    np.testing.assert_allclose(dm.norm_mean, train.mean(axis=(0, 1, 2)), atol=6e-5)
    np.testing.assert_allclose(dm.norm_std, train.std(axis=(0, 1, 2)), atol=6e-5)
    expected = (raw - torch.tensor(dm.norm_mean).view(3, 1, 1)) / torch.tensor(dm.norm_std).view(3, 1, 1)
    torch.testing.assert_close(x, expected)
    plain = make_dm(tiny_folder, normalize=False)
    plain.setup("test")
    torch.testing.assert_close(plain.test_set[0][0], raw)
    assert plain.norm_mean == (0.0, 0.0, 0.0) and plain.norm_std == (1.0, 1.0, 1.0)


def test_standard_augmentation_crops_and_flips(tiny_folder):
    dm = make_dm(tiny_folder, augment="standard", normalize=False)
    dm.setup("fit")
    torch.manual_seed(0)
    raw = torch.from_numpy(dm.train_set.images[dm.train_set.indices[0]]).permute(2, 0, 1).float() / 255
    outs = [dm.train_set[0][0] for _ in range(40)]
    assert any(not torch.allclose(o, raw, atol=1e-6) for o in outs)  # augmentation changes the image
    # every output is the padded image shifted by at most 4 pixels, possibly flipped
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    for o in outs:
        found = any(
            torch.allclose(o, cand, atol=1e-6)
            for dy in range(9)
            for dx in range(9)
            for cand in (padded[:, dy : dy + 32, dx : dx + 32], padded[:, dy : dy + 32, dx : dx + 32].flip(-1))
        )
        assert found


def test_unknown_augment_is_a_user_error(tiny_folder):
    with pytest.raises(UserError, match="unknown augmentation preset 'cutmix'.*none, standard"):
        make_dm(tiny_folder, augment="cutmix")


def _write_torchvision_format(root: Path, n_per_batch: int = 6) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = list(rng.integers(0, 10, n_per_batch))
        flat = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": flat, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)


def test_torchvision_format(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10, cifar

    _write_torchvision_format(tmp_path)
    # the md5 sums of the real files would not match these small stand-ins
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a: True)
    dm = make_dm(tmp_path, val_size=5)
    assert dm.source.kind == "torchvision" and dm.class_names == list(CIFAR10_CLASSES)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (25, 5, 6)
    assert dm.train_set.images.dtype == np.uint8 and dm.train_set.images.shape == (30, 32, 32, 3)


def test_download_failure_says_where_and_how(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(CIFAR10, "download", offline)
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nothing"), download=True)  # downloads nothing yet
    with pytest.raises(UserError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert str(tmp_path / "nothing") in msg and "network unreachable" in msg
    assert "--data-dir" in msg and "--download" in msg


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_is_extracted_once(tmp_path, monkeypatch, kind):
    tree = write_image_folder(tmp_path / "tree", n_train=4, n_test=2)
    archive = tmp_path / f"data.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted(tree.rglob("*")):
                zf.write(p, p.relative_to(tree))
    else:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(tree, arcname="cifar")  # one top-level folder around train/ and test/
    dm = make_dm(archive, val_size=2)
    assert dm.source.kind == "folder" and dm.class_names == ["cat", "dog", "frog"]
    assert str(dm.source.root).startswith(os.environ["CIFAR_LIGHTNING_CACHE"])
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 12

    calls = []
    monkeypatch.setattr(archives, "safe_extract", lambda *a: calls.append(a))
    again = make_dm(archive, val_size=2)
    assert calls == [] and again.source.root == dm.source.root


def _tar_with(tmp_path: Path, name: str, *, link: bool = False) -> Path:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        ok = tarfile.TarInfo("train/cat/ok.png")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"abc"))
        bad = tarfile.TarInfo(name)
        if link:
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(bad)
        else:
            bad.size = 4
            tar.addfile(bad, io.BytesIO(b"evil"))
    return archive


@pytest.mark.parametrize(
    "name, link", [("../escaped.txt", False), ("/tmp/absolute-escape.txt", False), ("train/cat/link", True)]
)
def test_unsafe_archive_is_refused_and_nothing_written(tmp_path, name, link):
    archive = _tar_with(tmp_path, name, link=link)
    dest = tmp_path / "out" / "x"
    with pytest.raises(UserError, match="refusing to extract"):
        safe_extract(archive, dest)
    assert not dest.exists() and not (tmp_path / "out" / "escaped.txt").exists()
    assert not Path("/tmp/absolute-escape.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []  # not even the temporary folder is left


def test_zip_with_parent_path_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escaped.txt", "evil")
    with pytest.raises(UserError, match="outside the extraction folder"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_truncated_archive_is_a_user_error(tmp_path):
    tree = write_image_folder(tmp_path / "tree", n_train=8, n_test=2)
    archive = tmp_path / "full.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=".")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        make_dm(cut)


def test_decoded_cache_is_used_and_rebuilt_when_stale(tiny_folder, monkeypatch):
    classes = ("cat", "dog", "frog")
    images, labels = load_image_folder_split(tiny_folder, "train", classes)
    assert list((tiny_folder / ".cifar_lightning_cache").glob("train-*.npz"))

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although the cache matches")

    monkeypatch.setattr(sources, "decode_image_folder", no_decoding)
    cached, cached_labels = load_image_folder_split(tiny_folder, "train", classes)
    assert np.array_equal(cached, images) and np.array_equal(cached_labels, labels)

    # change one image: the cache no longer matches and is rebuilt from the files
    monkeypatch.undo()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tiny_folder / "train" / "cat" / "000.png")
    fresh, _ = load_image_folder_split(tiny_folder, "train", classes)
    assert fresh[0].max() == 0 and not np.array_equal(fresh, images)
    assert len(list((tiny_folder / ".cifar_lightning_cache").glob("train-*.npz"))) == 1


def test_unreadable_image_is_skipped_with_a_warning(tiny_folder):
    bad = tiny_folder / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match="broken.png"):
        images, labels = load_image_folder_split(tiny_folder, "train", ("cat", "dog", "frog"))
    assert len(images) == 36 and np.bincount(labels).tolist() == [12, 12, 12]


def test_other_sizes_and_modes_are_converted(tmp_path):
    root = write_image_folder(tmp_path / "d", n_train=2, n_test=1)
    Image.new("L", (64, 48), 200).save(root / "train" / "cat" / "big_gray.png")
    images, _ = load_image_folder_split(root, "train", ("cat", "dog", "frog"))
    assert images.shape == (7, 32, 32, 3)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda r: None, "no CIFAR-10 data at"),
        (lambda r: r.mkdir(), "holds neither cifar-10-batches-py"),
        (lambda r: (write_image_folder(r), (r / "test" / "dog").rename(r / "test" / "horse")), "class folders under"),
        (lambda r: (write_image_folder(r), [p.unlink() for p in (r / "train" / "dog").iterdir()]), "holds no images"),
    ],
    ids=["missing", "empty", "classes-differ", "empty-class"],
)
def test_bad_data_dirs_are_user_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(UserError, match=message):
        make_dm(root)


@pytest.mark.data
def test_real_images_subset(real_subset):
    dm = make_dm(real_subset, val_size=100)
    assert dm.class_names == list(CIFAR10_CLASSES)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (500, 100, 200)
    # real images: the per-channel mean of the decoded pixels is close to the published constants
    mean = dm.train_set.images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, CIFAR10_MEAN, atol=0.03)
    assert np.bincount(dm.test_set.labels).tolist() == [20] * 10
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32) and abs(float(x.mean())) < 1.0


def test_translate_and_flip_presets_in_the_pil_path(tiny_folder):
    # translate: a crop of the 2-pixel reflect-padded image, possibly mirrored; flip: only mirrored
    dm = make_dm(tiny_folder, augment="translate", normalize=False)
    dm.setup("fit")
    raw = torch.from_numpy(dm.train_set.images[dm.train_set.indices[0]]).permute(2, 0, 1).float() / 255
    padded = torch.nn.functional.pad(raw[None], (2, 2, 2, 2), mode="reflect")[0]
    crops = [padded[:, dy : dy + 32, dx : dx + 32] for dy in range(5) for dx in range(5)]
    torch.manual_seed(0)
    for _ in range(20):
        out = dm.train_set[0][0]
        assert any(torch.allclose(out, c, atol=1e-6) or torch.allclose(out, c.flip(-1), atol=1e-6) for c in crops)
    flip_only = make_dm(tiny_folder, augment="flip", normalize=False)
    flip_only.setup("fit")
    outs = [flip_only.train_set[0][0] for _ in range(20)]
    assert all(torch.allclose(o, raw) or torch.allclose(o, raw.flip(-1)) for o in outs)
    assert any(torch.allclose(o, raw.flip(-1)) for o in outs) and any(torch.allclose(o, raw) for o in outs)


_COUNTED_LOAD = """
import sys, time
from pathlib import Path
from cifar_lightning.data import sources
decode = sources.decode_image_folder
def counted(*args, **kwargs):
    with open(sys.argv[2], "a") as f:
        f.write("decode\\n")
    time.sleep(3)  # long enough for the other process to come looking while this one decodes
    return decode(*args, **kwargs)
sources.decode_image_folder = counted
ready = Path(sys.argv[2]).with_name(f"ready-{sys.argv[3]}")
ready.touch()
while len(list(ready.parent.glob("ready-*"))) < 2:  # both processes have imported torch: start together
    time.sleep(0.01)
images, _ = sources.load_image_folder_split(Path(sys.argv[1]), "train", ("cat", "dog", "frog"))
print(len(images))
"""


def test_processes_that_find_no_cache_together_decode_once(tiny_folder, tmp_path):
    """Every rank of a torchrun job builds its data module at once: one decodes, the others wait
    on the cache's lock and read what it wrote."""
    import subprocess
    import sys

    log = tmp_path / "decodes.txt"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _COUNTED_LOAD, str(tiny_folder), str(log), str(i)], stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outputs == ["36", "36"] and log.read_text() == "decode\n"
