"""``--dataset cifar10|cifar100|folder``: CIFAR-100 in torchvision's own files, your own image folder
of mixed sizes and modes, and every step after training (test, evaluate, predict, export) on both.

No copy of CIFAR-100 exists here, so ``cifar100_files`` writes small files in torchvision's exact
format (``cifar-100-python/{train,test,meta}``, pickles with ``fine_labels``, ``coarse_labels``
and the label names), and torchvision's own ``CIFAR100`` class reads them: only its checksum step
is patched, since the stand-ins cannot match the real files' md5 sums.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import labelled_image, write_image_folder
from PIL import Image

from cifar_lightning.checkpoint import load_classifier
from cifar_lightning.constants import CIFAR10_MEAN, CIFAR100_CLASSES, CIFAR100_MEAN, CIFAR100_STD, CIFAR100_SUPERCLASSES
from cifar_lightning.data import CIFAR10DataModule, datasets
from cifar_lightning.data.sources import decode_image
from cifar_lightning.errors import UserError
from cifar_lightning.export import export_main
from cifar_lightning.fit import fit_main
from cifar_lightning.inference import predict_logits
from cifar_lightning.predict import predict_main

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
#: The superclass of each fine class, from the table (what the files' coarse_labels must agree with).
COARSE_OF = [next(i for i, m in enumerate(CIFAR100_SUPERCLASSES.values()) if c in m) for c in CIFAR100_CLASSES]


def write_cifar100(root: Path, n_train: int = 3, n_test: int = 1, seed: int = 0, coarse_of=COARSE_OF) -> Path:
    """``root/cifar-100-python/`` as torchvision downloads it, ``n_*`` images a class, each encoding its
    class (``labelled_image``) so that a network can learn them."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.permutation(np.repeat(np.arange(100), n))
        # labelled_image encodes labels 0-9: the superclass modulo 10 keeps images of one group alike.
        images = np.stack([labelled_image(int(coarse_of[f]) % 10, rng) for f in fine])  # (N, 32, 32, 3)
        entry = {
            "filenames": [f"img_{i}.png" for i in range(len(fine))],
            "batch_label": f"{split} batch",
            "fine_labels": [int(f) for f in fine],
            "coarse_labels": [int(coarse_of[f]) for f in fine],
            "data": images.transpose(0, 3, 1, 2).reshape(len(fine), 3072),  # rows of R, G, B planes
        }
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(CIFAR100_CLASSES), "coarse_label_names": list(CIFAR100_SUPERCLASSES)}, f)
    return root


@pytest.fixture
def no_checksums(monkeypatch):
    from torchvision.datasets import CIFAR100, cifar

    monkeypatch.setattr(CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a: True)


@pytest.fixture
def cifar100_files(tmp_path, no_checksums) -> Path:
    return write_cifar100(tmp_path / "c100")


def test_cifar100_files_are_read_by_torchvision_with_their_labels(cifar100_files):
    dm = CIFAR10DataModule(data_dir=str(cifar100_files), download=False, val_size=20, num_workers=0)
    assert (dm.source.kind, dm.dataset_name) == ("torchvision", "cifar100")  # detected from the folder
    assert dm.class_names == list(CIFAR100_CLASSES) and dm.num_classes == 100
    assert dm.norm_mean == CIFAR100_MEAN and dm.norm_std == CIFAR100_STD
    assert dm.superclass_names == list(CIFAR100_SUPERCLASSES) and dm.superclasses == COARSE_OF
    dm.setup("fit")
    dm.setup("test")
    with open(cifar100_files / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f)
    images, labels = dm.train_set.images, np.asarray(dm.train_set.labels)
    np.testing.assert_array_equal(labels, raw["fine_labels"])
    np.testing.assert_array_equal(images[5].transpose(2, 0, 1).reshape(-1), raw["data"][5])
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (280, 20, 100)
    # Named explicitly, the same files are read the same way.
    named = CIFAR10DataModule(data_dir=str(cifar100_files), dataset="cifar100", download=False, num_workers=0)
    assert named.source == dm.source


def test_cifar100_files_whose_coarse_labels_disagree_are_refused(tmp_path, no_checksums):
    shuffled = list(np.roll(COARSE_OF, 5))
    root = write_cifar100(tmp_path / "bad", coarse_of=shuffled)
    dm = CIFAR10DataModule(data_dir=str(root), download=False, num_workers=0)
    with pytest.raises(UserError, match="coarse labels .* do not match CIFAR-100's superclass table"):
        dm.setup("fit")


def test_dataset_and_data_that_disagree_get_one_clear_error(tiny_folder, cifar100_files, tmp_path):
    with pytest.raises(
        UserError,
        match=r"--dataset cifar10 expects the 10 class folders of CIFAR-10, but .* has 3 "
        r"\(cat, dog, frog\).*Pass --dataset folder",
    ):
        CIFAR10DataModule(data_dir=str(tiny_folder), dataset="cifar10", download=False)
    with pytest.raises(UserError, match="holds CIFAR-100 .* not CIFAR-10. Pass --dataset cifar100"):
        CIFAR10DataModule(data_dir=str(cifar100_files), dataset="cifar10", download=False)
    with pytest.raises(UserError, match="unknown dataset 'imagenet'. Valid names: cifar10, cifar100, folder"):
        CIFAR10DataModule(data_dir=str(tiny_folder), dataset="imagenet", download=False)
    with pytest.raises(UserError, match="--dataset folder reads your own images"):
        CIFAR10DataModule(data_dir=str(tmp_path / "nothing"), dataset="folder", download=True)
    dm = CIFAR10DataModule(data_dir=str(tiny_folder), dataset="folder", download=False)
    assert dm.dataset_name == "folder" and dm.superclasses is None


def test_the_cli_refuses_a_dataset_mismatch_with_exit_2(tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        fit_main(
            ["--data-dir", str(tiny_folder), "--dataset", "cifar100", "--output-dir", str(tmp_path), "--fast-dev-run"]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "expects the 100 class folders of CIFAR-100" in err and "Traceback" not in err


def test_cifar100_download_uses_torchvision_cifar100(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    calls = []

    def offline(self):
        calls.append(type(self).__name__)
        raise OSError("network unreachable")

    monkeypatch.setattr(CIFAR100, "download", offline)
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nothing"), dataset="cifar100", download=True)
    assert dm.source.needs_download and dm.class_names == list(CIFAR100_CLASSES)
    with pytest.raises(UserError, match="no CIFAR-100 data at .*network unreachable"):
        dm.prepare_data()
    assert calls == ["CIFAR100"]


def test_channel_stats_are_exact_population_figures():
    images = np.random.default_rng(0).integers(0, 256, (50, 7, 5, 3), dtype=np.uint8)
    mean, std = datasets.channel_stats(images)
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), atol=5e-5)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), atol=5e-5)  # population std (ddof 0)


def test_folder_statistics_are_computed_once_and_cached_with_the_arrays(tiny_folder, monkeypatch):
    from cifar_lightning.data import sources

    first = CIFAR10DataModule(data_dir=str(tiny_folder), download=False)
    mean, std = first.norm_mean, first.norm_std
    assert mean != CIFAR10_MEAN and len(list((tiny_folder / ".cifar_lightning_cache").glob("train-*.stats.json"))) == 1

    def not_again(*a, **k):
        raise AssertionError("decoded or computed again")

    monkeypatch.setattr(sources, "decode_image_folder", not_again)
    monkeypatch.setattr(datasets, "channel_stats", not_again)  # read from the .stats.json
    again = CIFAR10DataModule(data_dir=str(tiny_folder), download=False)
    assert (again.norm_mean, again.norm_std) == (mean, std)
    # Given constants win over the computed ones.
    given = CIFAR10DataModule(data_dir=str(tiny_folder), download=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert given.norm_mean == (0.5, 0.5, 0.5)
    with pytest.raises(UserError, match="mean and --data.std together"):
        CIFAR10DataModule(data_dir=str(tiny_folder), download=False, mean=(0.5, 0.5, 0.5))


def write_mixed_folder(root: Path, n_train: int = 10, n_test: int = 4) -> Path:
    """3 classes of images that are not 32x32 RGB: a JPEG 64x48, a greyscale PNG 20x20, a palette or
    RGBA PNG 40x40, each encoding its class."""
    rng = np.random.default_rng(1)
    kinds = {
        "apples": ((64, 48), "RGB", ".jpg"),
        "grey_things": ((20, 20), "L", ".png"),
        "icons": ((40, 40), "RGBA", ".png"),
    }
    for split, n in (("train", n_train), ("test", n_test)):
        for label, (name, (size, mode, suffix)) in enumerate(kinds.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(labelled_image(label * 4, rng)).resize(size).convert(mode)
                if name == "icons" and i % 2:
                    img = img.convert("RGB").convert("P")
                img.save(root / split / name / f"{i:03d}{suffix}")
    return root


def _fit(data: Path, out: Path, *extra: str) -> dict:
    return fit_main(
        [
            "--data-dir",
            str(data),
            "--output-dir",
            str(out),
            "--num-workers",
            "0",
            "--arch",
            "simple_cnn",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--lr",
            "0.02",
            *QUIET,
            *extra,
        ]
    )


def _downstream(ckpt: Path, data: Path, out: Path, classes: list[str], image: Path) -> list[dict]:
    """Evaluate, predict and export ``ckpt``: each must run and name ``classes``."""
    from cifar_lightning.evaluation import evaluate_main

    report = evaluate_main([str(ckpt), "--data-dir", str(data), "--output-dir", str(out / "eval")])
    assert report["class_names"] == classes
    assert predict_main([str(ckpt), str(image), "--top-k", "3", "--output", str(out / "pred.csv")]) == 0
    rows = list(csv.DictReader(open(out / "pred.csv")))
    ranked = [k for k in rows[0] if k.startswith("class_")]
    assert (
        len(rows) == 1 and ranked == ["class_1", "class_2", "class_3"] and {rows[0][k] for k in ranked} <= set(classes)
    )
    assert export_main([str(ckpt), "--format", "onnx", "--output", str(out / "m.onnx"), "--data-dir", str(data)]) == 0
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out / "m.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == classes
    return rows


def test_folder_of_mixed_sizes_and_modes_end_to_end(tmp_path):
    data = write_mixed_folder(tmp_path / "mixed")
    classes = ["apples", "grey_things", "icons"]
    report = _fit(data, tmp_path / "runs", "--dataset", "folder", "--val-size", "6")
    assert report["class_names"] == classes and report["test_images"] == 12
    ckpt = Path(report["checkpoint"])
    model = load_classifier(ckpt)
    dm = CIFAR10DataModule(data_dir=str(data), download=False)
    assert model.class_names == classes and tuple(model.hparams.norm_mean) == dm.norm_mean != CIFAR10_MEAN
    # Training read each file as prediction reads it: one decoder, resized to 32x32 RGB.
    images, _ = dm.split_arrays("test")
    first = sorted((data / "test" / "apples").iterdir())[0]
    np.testing.assert_array_equal(images[0], decode_image(first))
    assert report["test_acc"] > 0.6  # three classes that differ plainly: chance is 1/3
    _downstream(ckpt, data, tmp_path, classes, first)


def test_cifar100_end_to_end_with_superclass_and_top5_accuracy(cifar100_files, tmp_path):
    report = _fit(cifar100_files, tmp_path / "runs", "--dataset", "cifar100", "--val-size", "50", "--epochs", "3")
    ckpt = Path(report["checkpoint"])
    model = load_classifier(ckpt)
    hp = model.hparams
    assert hp.num_classes == 100 and hp.superclass_names == list(CIFAR100_SUPERCLASSES) and hp.superclasses == COARSE_OF
    assert tuple(hp.norm_mean) == CIFAR100_MEAN
    run_dir = ckpt.parent.parent
    metrics = [row for row in csv.DictReader(open(run_dir / "metrics.csv")) if row.get("test/acc")]
    (test_row,) = metrics
    # The logged superclass and top-5 accuracies, recomputed from the model's own test logits.
    dm = CIFAR10DataModule(data_dir=str(cifar100_files), download=False)
    images, labels = dm.split_arrays("test")
    logits = predict_logits(model, images)
    group = torch.tensor(COARSE_OF)
    labels = torch.as_tensor(labels)
    super_acc = (group[logits.argmax(1)] == group[labels]).float().mean().item()
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert float(test_row["test/acc_superclass"]) == pytest.approx(super_acc, abs=1e-6)
    assert float(test_row["test/acc_top5"]) == pytest.approx(top5, abs=1e-6)
    # The images of one superclass look alike, so it is learnt before the classes are.
    assert super_acc > float(test_row["test/acc"]) and super_acc > 0.15  # chance: 5%
    image = tmp_path / "one.png"
    Image.fromarray(images[0]).save(image)
    _downstream(ckpt, cifar100_files, tmp_path, list(CIFAR100_CLASSES), image)


def test_a_cifar10_folder_is_detected_as_cifar10(tmp_path):
    from cifar_lightning.constants import CIFAR10_CLASSES, CIFAR10_STD

    data = write_image_folder(tmp_path / "c10", classes=CIFAR10_CLASSES, n_train=2, n_test=1)
    dm = CIFAR10DataModule(data_dir=str(data), download=False)
    assert dm.dataset_name == "cifar10" and (dm.norm_mean, dm.norm_std) == (CIFAR10_MEAN, CIFAR10_STD)
    assert not (data / ".cifar_lightning_cache").exists()  # the published constants: nothing decoded


def test_image_size_reads_every_source_at_that_size(tmp_path, cifar100_files):
    data = write_mixed_folder(tmp_path / "mixed", n_train=4, n_test=2)
    dm = CIFAR10DataModule(data_dir=str(data), download=False, image_size=48, val_size=3, num_workers=0)
    images, _ = dm.split_arrays("test")
    first = sorted((data / "test" / "apples").iterdir())[0]
    assert images.shape == (6, 48, 48, 3)
    np.testing.assert_array_equal(images[0], decode_image(first, size=48))  # as prediction reads it
    dm.setup("fit")
    x, _ = dm.train_set[0]
    assert x.shape == (3, 48, 48)  # the crop keeps the size
    batch, _ = next(iter(dm.tensor_loader(dm.train_set, train=True)))
    assert batch.shape[1:] == (3, 48, 48)
    # CIFAR's arrays are resized by the same rule.
    c100 = CIFAR10DataModule(data_dir=str(cifar100_files), download=False, image_size=40, num_workers=0)
    arrays, _ = c100.split_arrays("test")
    assert arrays.shape == (100, 40, 40, 3)
    with pytest.raises(UserError, match="image_size must be between 8 and 1024"):
        CIFAR10DataModule(data_dir=str(data), download=False, image_size=4)


def test_a_network_that_cannot_take_the_size_is_refused(tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        fit_main(
            [
                "--data-dir",
                str(tiny_folder),
                "--output-dir",
                str(tmp_path),
                "--arch",
                "simple_cnn",
                "--image-size",
                "48",
                "--fast-dev-run",
                *QUIET,
            ]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "simple_cnn cannot take 48x48 images" in err and "Traceback" not in err


def test_a_run_at_another_image_size_is_evaluated_predicted_and_exported_at_it(tmp_path):
    data = write_mixed_folder(tmp_path / "mixed", n_train=6, n_test=2)
    report = _fit(
        data,
        tmp_path / "runs",
        "--dataset",
        "folder",
        "--val-size",
        "3",
        "--arch",
        "resnet20",
        "--image-size",
        "40",
        "--epochs",
        "1",
    )
    ckpt = Path(report["checkpoint"])
    assert load_classifier(ckpt).hparams.image_size == 40
    first = sorted((data / "test" / "apples").iterdir())[0]
    _downstream(ckpt, data, tmp_path, ["apples", "grey_things", "icons"], first)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["image_size"] == "40" and "(B, 3, 40, 40)" in meta["input"]
    # Prediction decodes at the model's size: its probabilities are those of the 40x40 decode.
    from cifar_lightning.predict import top_k

    model = load_classifier(ckpt)
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    (at_40,) = top_k(model, decode_image(first, size=40)[None], k=1)
    (at_32,) = top_k(model, decode_image(first, size=32)[None], k=1)
    assert (rows[0]["class_1"], float(rows[0]["probability_1"])) == (at_40[0][0], pytest.approx(at_40[0][1], abs=2e-6))
    assert abs(at_40[0][1] - at_32[0][1]) > 1e-4  # so the check above tells the two sizes apart


@pytest.mark.data
def test_the_real_copy_as_a_folder_gets_its_own_statistics(real_cifar10):
    """The JPEG copy read as ``folder``: its statistics computed from its 50,000 training images are
    the figures ``constants.py`` quotes for it, beside CIFAR-10's own that ``cifar10`` uses."""
    from cifar_lightning.constants import CIFAR10_STD

    as_cifar10 = CIFAR10DataModule(data_dir=str(real_cifar10), download=False)
    assert as_cifar10.dataset_name == "cifar10" and (as_cifar10.norm_mean, as_cifar10.norm_std) == (
        CIFAR10_MEAN,
        CIFAR10_STD,
    )
    as_folder = CIFAR10DataModule(data_dir=str(real_cifar10), dataset="folder", download=False)
    assert as_folder.class_names == as_cifar10.class_names
    assert as_folder.norm_mean == (0.4913, 0.4821, 0.4465) and as_folder.norm_std == (0.2452, 0.2428, 0.2606)


def test_a_model_built_by_hand_takes_the_data_modules_description(tmp_path):
    """Without the CLI's links, a plain Trainer.fit still records in the checkpoint how the data was
    read: the folder's own statistics, its image size and its class names."""
    import lightning.pytorch as pl

    from cifar_lightning import ClassifierModule

    data = write_mixed_folder(tmp_path / "mixed", n_train=4, n_test=2)
    dm = CIFAR10DataModule(data_dir=str(data), download=False, image_size=40, val_size=3, batch_size=4, num_workers=0)
    model = ClassifierModule(arch="resnet20", num_classes=3)
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "hand.ckpt")
    saved = load_classifier(tmp_path / "hand.ckpt").hparams
    assert tuple(saved.norm_mean) == dm.norm_mean != CIFAR10_MEAN and tuple(saved.norm_std) == dm.norm_std
    assert saved.image_size == 40 and list(saved.class_names) == ["apples", "grey_things", "icons"]
    with pytest.raises(UserError, match="built for 10 classes, but the data has 3"):
        pl.Trainer(
            max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
        ).fit(ClassifierModule(arch="resnet20"), datamodule=dm)


def test_a_folder_with_both_torchvision_datasets_needs_a_name(cifar100_files, monkeypatch):
    from test_data import _write_torchvision_format
    from torchvision.datasets import CIFAR10

    _write_torchvision_format(cifar100_files)  # torchvision's usual data/ holds both
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    with pytest.raises(
        UserError,
        match="holds both cifar-10-batches-py and cifar-100-python: say which to read "
        "with --dataset cifar10 or --dataset cifar100",
    ):
        CIFAR10DataModule(data_dir=str(cifar100_files), download=False)
    for name, classes in (("cifar10", 10), ("cifar100", 100)):
        dm = CIFAR10DataModule(data_dir=str(cifar100_files), dataset=name, download=True, num_workers=0)
        assert (dm.dataset_name, dm.num_classes, dm.source.needs_download) == (name, classes, False)


def test_caches_of_two_image_sizes_live_side_by_side_and_follow_the_files(tmp_path):
    data = write_mixed_folder(tmp_path / "mixed", n_train=3, n_test=1)
    small = CIFAR10DataModule(data_dir=str(data), download=False)
    big = CIFAR10DataModule(data_dir=str(data), download=False, image_size=40)
    stats_32, stats_40 = (small.norm_mean, small.norm_std), (big.norm_mean, big.norm_std)
    cache = data / ".cifar_lightning_cache"
    names = sorted(p.name for p in cache.glob("train-*"))
    assert len(names) == 4 and sum("-40px-" in n for n in names) == 2  # arrays and statistics of each size
    # A changed image makes both the arrays and the statistics of that size be computed again.
    img = data / "train" / "apples" / "000.jpg"
    Image.new("RGB", (64, 48), (255, 255, 255)).save(img)
    again = CIFAR10DataModule(data_dir=str(data), download=False)
    assert (again.norm_mean, again.norm_std) != stats_32
    now = sorted(p.name for p in cache.glob("train-*"))
    assert len(now) == 4 and not set(n for n in names if "-40px-" not in n) & set(now)  # the old 32 px files went
    assert sorted(p.name for p in cache.glob("train-40px-*")) == [n for n in names if "-40px-" in n]
    assert CIFAR10DataModule(data_dir=str(data), download=False, image_size=40).norm_mean != stats_40[0]


def test_a_checkpoint_that_let_the_data_say_its_dataset_is_read_as_its_class_names_say():
    from cifar_lightning.checkpoint import stored_dataset

    def ckpt(names, dataset=None, size=None):
        return {
            "hyper_parameters": {"class_names": list(names), **({"image_size": size} if size else {})},
            "datamodule_hyper_parameters": {"dataset": dataset},
        }

    assert stored_dataset(ckpt(CIFAR100_CLASSES)) == {"dataset": "cifar100"}
    assert stored_dataset(ckpt(["a", "b"], size=40)) == {"dataset": "folder", "image_size": 40}
    assert stored_dataset(ckpt(CIFAR100_CLASSES, dataset="folder")) == {"dataset": "folder"}  # as it was named


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def partial_then_offline(self):
        # torchvision makes the folder and starts writing the archive before the network fails
        Path(self.root).mkdir(parents=True, exist_ok=True)
        (Path(self.root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise OSError("network unreachable")

    monkeypatch.setattr(CIFAR10, "download", partial_then_offline)
    new = tmp_path / "new" / "data"  # two levels that do not exist yet
    with pytest.raises(UserError, match="network unreachable"):
        CIFAR10DataModule(data_dir=str(new), download=True).prepare_data()
    assert not (tmp_path / "new").exists()
    there = tmp_path / "there"
    there.mkdir()
    (there / "mine.txt").write_text("kept")
    with pytest.raises(UserError, match="network unreachable"):
        CIFAR10DataModule(data_dir=str(there), download=True).prepare_data()
    assert sorted(p.name for p in there.iterdir()) == ["mine.txt"]


def test_an_archive_path_that_does_not_exist_is_not_a_folder_to_download_into(tmp_path, capsys):
    (tmp_path / "cifar10-jpeg.tar.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    for name in ("cifar10.tar.gz", "cifar10.tgz", "images.zip", "images.tar"):
        with pytest.raises(UserError, match=rf"archive .*{name} not found\. .* holds: cifar10-jpeg\.tar\.gz\.") as err:
            CIFAR10DataModule(data_dir=str(tmp_path / name), download=True)
        assert "download" not in str(err.value)
        assert not (tmp_path / name).exists()
    with pytest.raises(UserError, match="its folder .*nowhere does not exist either"):
        CIFAR10DataModule(data_dir=str(tmp_path / "nowhere" / "c.tar.gz"))
    with pytest.raises(SystemExit) as exc:
        fit_main(["--data-dir", str(tmp_path / "cifar10.tar.gz")])
    assert exc.value.code == 2 and "not found" in capsys.readouterr().err
