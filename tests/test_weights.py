"""Trained weights: published from a recipe's kept runs, loaded through torch.hub, the package and
the scripts, checked against their sha256, and fed images in [0, 1].

The machinery is exercised on weights the tests publish themselves (a tiny simple_cnn, through the
same ``publish`` as the real ones, into a weights folder of their own). The weights the package
ships are tested entry by entry from its manifest; without entries those tests skip, saying so.
"""

from __future__ import annotations

import configparser
import fnmatch
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import REPO
from PIL import Image
from test_evaluate import CLASSES, trained_run
from torchvision.transforms import ToTensor

from benchmarks import publish_weights, reproduce
from benchmarks.provenance import finish, provenance
from cifar_lightning.checkpoint import load_classifier, read_checkpoint
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.errors import UserError
from cifar_lightning.evaluation import evaluate, evaluate_main
from cifar_lightning.export import export_main
from cifar_lightning.inference import predict_logits
from cifar_lightning.models import Normalized, WeightsError, create_model, list_models, list_pretrained
from cifar_lightning.models.card import weights_markdown
from cifar_lightning.models.pretrained import PACKAGE_WEIGHTS, WEIGHTS_ENV, load_weights, read_manifest, weights_bytes
from cifar_lightning.module import ClassifierModule
from cifar_lightning.predict import load_input, predict_main

RECIPE = "tiny_recipe"
ARCH = "simple_cnn"
LABEL = "JPEG q75 copy (tiny)"  # as reproduce.py labels a run on a JPEG copy


# ---------------------------------------------------------------------------------------------
# Weights the tests publish: three kept runs of a recipe, the median one's checkpoint
# ---------------------------------------------------------------------------------------------


def test_accuracy(ckpt: Path, data: Path) -> float:
    """What the checkpoint's run would have reported: its accuracy on the data's test split, with
    its own TTA mode, as trainer.test measures it."""
    images, labels = CIFAR10DataModule(str(data), download=False, num_workers=0).split_arrays("test")
    module = load_classifier(ckpt)
    metrics = evaluate(module, images, labels, tta=module.hparams.tta).metrics()
    return metrics["tta"]["test_acc"] if module.hparams.tta != "none" else metrics["test_acc"]


test_accuracy.__test__ = False  # a helper, not a test


def keep_runs(results: Path, configs: Path, ckpt: dict, data: Path) -> float:
    """What ``scripts/reproduce.py --keep-checkpoints`` leaves: three reports, seed 1 the median,
    with ``ckpt`` as its tested checkpoint; returns seed 1's accuracy."""
    results.mkdir(parents=True, exist_ok=True)
    configs.mkdir(parents=True, exist_ok=True)
    (configs / f"{RECIPE}.yaml").write_text(f"# {RECIPE}: the tests' recipe.\n# expected: above chance.\n")
    torch.save(ckpt, results / f"{RECIPE}-seed1.ckpt")
    acc = test_accuracy(results / f"{RECIPE}-seed1.ckpt", data)
    for seed, value in ((0, acc - 0.1), (1, acc), (2, acc + 0.05)):
        prov = provenance(str(data))
        report = {
            "arch": ARCH,
            "test_acc": value,
            "seed": seed,
            "fit_seconds": 60.0 + seed,
            "test_seconds": 1.0,
            "epochs": 2,
            "global_step": 20,
            "train_images": 40,
            "recipe": RECIPE,
            "data": LABEL,
            "hardware": {"cpu": "x86_64 x2 cores", "gpu": "-"},
            "date": "2026-01-01",
            "provenance": finish(prov),
        }
        (results / f"{RECIPE}-seed{seed}.json").write_text(json.dumps(report))
    return acc


def publish(base: Path, ckpt: dict, data: Path, weights: Path, *extra: str) -> dict:
    results, configs = base / "results", base / "configs"
    keep_runs(results, configs, ckpt, data)
    args = [
        RECIPE,
        "--data-dir",
        str(data),
        "--results",
        str(results),
        "--configs",
        str(configs),
        "--weights-dir",
        str(weights),
        "--corruptions",
        "0",
        *extra,
    ]
    (entry,) = publish_weights.main(args)
    return entry


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def published(run, tmp_path_factory) -> tuple[Path, dict, Path]:
    """(weights folder, its simple_cnn entry, data folder), published from the tiny run."""
    ckpt, data = run
    base = tmp_path_factory.mktemp("publish")
    card = base / "models.md"
    entry = publish(
        base, torch.load(ckpt, weights_only=True), data, base / "weights", "--card", str(card), "--corruptions", "6"
    )
    return base / "weights", entry, data


@pytest.fixture
def weights(published, monkeypatch, tmp_path) -> Path:
    """A copy of the published folder, which the package reads instead of its own."""
    folder = shutil.copytree(published[0], tmp_path / "weights")
    monkeypatch.setenv(WEIGHTS_ENV, str(folder))
    return folder


def test_publish_ships_the_median_seed_under_its_sha256(published):
    folder, entry, _ = published
    data = (folder / entry["file"]).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert entry["file"] == f"{ARCH}-{digest[:10]}.pt" and entry["sha256"] == digest and entry["bytes"] == len(data)
    assert sorted(p.name for p in folder.iterdir()) == sorted([entry["file"], "manifest.json"])
    assert read_manifest(folder)["weights"] == {ARCH: entry}
    assert entry["shipped_seed"] == 1 and entry["seeds"] == [0, 1, 2] and "median" in entry["selection_rule"]
    accs = list(entry["test_acc"]["per_seed"].values())
    assert entry["test_acc"]["n"] == 3 and entry["test_acc"]["mean"] == pytest.approx(np.mean(accs))
    assert entry["test_acc"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert entry["shipped"]["test_acc"] == pytest.approx(entry["test_acc"]["per_seed"]["1"])
    assert entry["class_names"] == list(CLASSES) and entry["num_classes"] == 4 and entry["url"] is None
    assert entry["training"]["fit_seconds"] == 61.0 and entry["training"]["machine"]["cpu"]
    assert entry["data"]["label"] == LABEL and entry["recipe"] == RECIPE
    assert entry["provenance"]["command"].startswith("python ") and entry["provenance"]["machine"]["cpu"]
    assert entry["corruptions"]["images"] == 6 and len(entry["corruptions"]["mean_by_corruption"]) == 15
    # A plain state dict of tensors, stored in float16 since that changed no prediction.
    state = torch.load(folder / entry["file"], weights_only=True)
    assert set(state) == set(create_model(ARCH, num_classes=4).state_dict())
    assert entry["dtype"] == "float16" and all(v.dtype == torch.float16 for v in state.values())
    assert entry["storage"]["changed_predictions"] == {"float16": {"plain": 0}}


def test_float32_is_kept_where_float16_changes_a_prediction(run, published, tmp_path):
    ckpt, data = run
    weights = shutil.copytree(published[0], tmp_path / "weights")
    doctored = torch.load(ckpt, weights_only=True)
    # Two classes whose logits differ by far less than float16 resolves, and beat the others on
    # every image: rounding the weights to float16 flips many of their predictions.
    state = doctored["state_dict"]
    w, b = state["model.8.weight"], state["model.8.bias"]
    w[1] = w[0] + 1e-6 * torch.randn(w[0].shape, generator=torch.Generator().manual_seed(0))
    b[:2], b[2:] = 100.0, -100.0
    entry = publish(tmp_path, doctored, data, weights)
    assert entry["dtype"] == "float32" and entry["storage"]["changed_predictions"]["float16"]["plain"] > 0
    assert torch.load(weights / entry["file"], weights_only=True)["8.weight"].dtype == torch.float32
    # The file it supersedes is gone; the manifest names the new one.
    assert sorted(p.name for p in weights.glob("*.pt")) == [entry["file"]] != [published[1]["file"]]


def test_a_recipe_with_tta_ships_both_figures(run, tmp_path, monkeypatch):
    ckpt, data = run
    trained = torch.load(ckpt, weights_only=True)
    trained["hyper_parameters"] |= {"tta": "flip_translate", "channels_last": True}
    entry = publish(tmp_path, trained, data, tmp_path / "weights")
    assert entry["tta"] == "flip_translate" and "flip_translate" in entry["test_acc"]["measure"]
    assert entry["shipped"]["test_acc_tta"] == pytest.approx(entry["test_acc"]["per_seed"]["1"])
    assert set(entry["storage"]["changed_predictions"]["float16"]) == {"plain", "tta"}
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "weights"))
    report = evaluate_main(
        [ARCH, "--data-dir", str(data), "--output-dir", str(tmp_path / "eval"), "--batch-size", "500"]
    )
    assert report["tta"]["mode"] == "flip_translate" and report["tta"]["test_acc"] == entry["shipped"]["test_acc_tta"]
    assert report["test_acc"] == entry["shipped"]["test_acc"]


def test_publish_refuses_runs_it_cannot_vouch_for(run, tmp_path, capsys):
    ckpt, data = run
    results, configs = tmp_path / "results", tmp_path / "configs"
    acc = keep_runs(results, configs, torch.load(ckpt, weights_only=True), data)
    args = [
        RECIPE,
        "--data-dir",
        str(data),
        "--results",
        str(results),
        "--configs",
        str(configs),
        "--weights-dir",
        str(tmp_path / "w"),
        "--corruptions",
        "0",
    ]
    report = json.loads((results / f"{RECIPE}-seed1.json").read_text())
    (results / f"{RECIPE}-seed1.json").write_text(json.dumps(report | {"test_acc": acc - 0.04}))
    with pytest.raises(SystemExit) as exc:
        publish_weights.main(args)
    assert exc.value.code == 2 and "not the model that run tested" in capsys.readouterr().err
    (results / f"{RECIPE}-seed1.ckpt").unlink()
    with pytest.raises(SystemExit):
        publish_weights.main(args)
    assert "--seeds 1 --keep-checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_median_seed_rule():
    assert publish_weights.median_seed({0: 0.9, 1: 0.8, 2: 0.85}) == 2
    assert publish_weights.median_seed({3: 0.9, 1: 0.8}) == 1  # an even count: the lower middle one
    assert publish_weights.median_seed({0: 0.8, 1: 0.8, 2: 0.8}) == 1


def test_a_weight_file_depends_on_its_tensors_only():
    state = create_model(ARCH).state_dict()
    assert weights_bytes(state) == weights_bytes({k: v.clone() for k, v in state.items()})
    assert weights_bytes(state) != weights_bytes(state, "float16")


# ---------------------------------------------------------------------------------------------
# Loading: torch.hub, the package, the scripts
# ---------------------------------------------------------------------------------------------


def hub_entrypoints() -> list[str]:
    """What ``torch.hub.list`` lists for a repository: the public callables of its hubconf.py."""
    hub = torch.hub._import_module("hubconf", str(REPO / "hubconf.py"))
    return sorted(f for f in dir(hub) if callable(getattr(hub, f)) and not f.startswith("_"))


def test_the_hub_lists_every_registered_network():
    assert hub_entrypoints() == list_models()
    model = torch.hub.load(str(REPO), "resnet20", source="local")
    assert type(model) is type(create_model("resnet20"))


def test_hub_and_package_load_the_published_weights(weights):
    entry = read_manifest(weights)["weights"][ARCH]
    model = torch.hub.load(str(REPO), ARCH, source="local", pretrained=True)
    assert isinstance(model, Normalized) and not model.training
    assert model.class_names == list(CLASSES) and model.pretrained_cfg == entry
    stored = torch.load(weights / entry["file"], weights_only=True)
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, stored[key].to(value.dtype)), key
    bare = create_model(ARCH, pretrained=True, normalize=False)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), bare((x - torch.tensor(entry["mean"])[:, None, None]) / torch.tensor(entry["std"])[:, None, None])
        )


def test_another_class_count_starts_the_head_afresh(weights, monkeypatch):
    with pytest.warns(UserWarning, match=r"predict 4 classes and this model 3, so 8.weight, 8.bias start afresh"):
        model = create_model(ARCH, num_classes=3, pretrained=True, normalize=False)
    assert model.class_names is None and model[8].out_features == 3
    ours = create_model(ARCH, num_classes=4, pretrained=True, normalize=False)
    assert torch.equal(model[0].weight, ours[0].weight)
    lines = []
    monkeypatch.setattr("cifar_lightning.module.rank_zero_info", lines.append)
    module = ClassifierModule(arch=ARCH, num_classes=3, pretrained=True)
    assert len(lines) == 1 and "8.weight, 8.bias start afresh; every other layer starts from the weights" in lines[0]
    assert torch.equal(module.model[7].weight, ours[7].weight) and module.model[8].out_features == 3
    with pytest.raises(WeightsError, match=r"the weights of simple_cnn do not fit this network \(missing"):
        load_weights(create_model("lenet5"), ARCH)  # another network's layers: nothing is copied


def test_fit_pretrained_starts_from_the_weights(weights, published, tmp_path, monkeypatch):
    from cifar_lightning.fit import expand_aliases, fit_main

    assert "--model.pretrained=true" in expand_aliases(["--pretrained"])
    data = published[2]
    report = fit_main(
        [
            "--arch",
            ARCH,
            "--pretrained",
            "--data-dir",
            str(data),
            "--output-dir",
            str(tmp_path),
            "--epochs",
            "1",
            "--lr",
            "1e-9",
            "--num-workers",
            "0",
            "--batch-size",
            "8",
            "--val-size",
            "4",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    # At a learning rate of 1e-9 the fine-tuned network is the shipped one, to float precision.
    fine_tuned = load_classifier(report["checkpoint"])
    assert fine_tuned.hparams.pretrained is False  # rebuilt from its own weights
    assert read_checkpoint(report["checkpoint"])["hyper_parameters"]["pretrained"] is True
    shipped = create_model(ARCH, num_classes=4, pretrained=True, normalize=False)
    for (key, value), theirs in zip(fine_tuned.model.state_dict().items(), shipped.state_dict().values()):
        torch.testing.assert_close(value, theirs, rtol=0, atol=1e-6, msg=key)
    # The checkpoint needs no weights folder to load again.
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "no-weights"))
    assert load_classifier(report["checkpoint"]).hparams.arch == ARCH


def test_the_scripts_take_a_name_and_reproduce_the_manifest(weights, published, tmp_path, capsys):
    entry, data = published[1], published[2]
    report = evaluate_main(
        [
            ARCH,
            "--data-dir",
            str(data),
            "--output-dir",
            str(tmp_path / "eval"),
            "--batch-size",
            str(entry["shipped"]["batch_size"]),
        ]
    )
    assert report["test_acc"] == entry["shipped"]["test_acc"]
    assert report["test_images"] == entry["shipped"]["test_images"]
    capsys.readouterr()
    image = next((data / "test" / "frog").iterdir())
    assert predict_main([ARCH, str(image), "--format", "json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["predictions"][0]["class"]
    assert top in CLASSES


def test_the_input_contract_is_images_in_0_1(weights, published, tmp_path):
    """The same image through predict.py's path and through the hub model gives the same logits;
    the ONNX export of the shipped weights gives them too."""
    data = published[2]
    files = sorted((data / "test").rglob("*.png"))[:5]
    module = load_classifier(ARCH)
    via_predict = predict_logits(module, np.stack([load_input(str(f)) for f in files]))
    model = torch.hub.load(str(REPO), ARCH, source="local", pretrained=True)
    images = torch.stack([ToTensor()(Image.open(f).convert("RGB")) for f in files])  # (5, 3, 32, 32) in [0, 1]
    with torch.no_grad():
        via_hub = model(images)
    torch.testing.assert_close(via_hub, via_predict)
    assert export_main([ARCH, "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {"image": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(exported), via_hub, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad weights: refused with one clear message, never loaded
# ---------------------------------------------------------------------------------------------


def damage(weights: Path, how: str) -> Path:
    path = next(weights.glob(f"{ARCH}-*.pt"))
    data = bytearray(path.read_bytes())
    if how == "changed byte":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(bytes(data[: len(data) - 100]))
    elif how == "missing":
        path.unlink()
    return path


@pytest.mark.parametrize(
    "how, message",
    [
        ("changed byte", r"was changed: its sha256 is [0-9a-f]{16}\.\.\. where the manifest says"),
        ("truncated", r"is truncated: [\d,]+ of its [\d,]+ bytes"),
        ("missing", r"is missing: .* does not exist"),
    ],
)
def test_bad_weight_files_are_refused(weights, how, message, capsys, tmp_path):
    damage(weights, how)
    loaders = [
        lambda: create_model(ARCH, pretrained=True),
        lambda: ClassifierModule(arch=ARCH, num_classes=4, pretrained=True),
        lambda: torch.hub.load(str(REPO), ARCH, source="local", pretrained=True),
    ]
    for load in loaders:
        with pytest.raises(WeightsError, match=message):
            load()
    scripts = [
        lambda: predict_main([ARCH, __file__]),
        lambda: evaluate_main([ARCH, "--output-dir", str(tmp_path)]),
        lambda: export_main([ARCH, "--format", "onnx", "--output", str(tmp_path / "m.onnx")]),
    ]
    for main in scripts:
        with pytest.raises(SystemExit) as exc:
            main()
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: the weights file of simple_cnn")
    assert not (tmp_path / "m.onnx").exists()


def test_a_name_without_weights_names_those_with(weights, capsys):
    with pytest.raises(WeightsError, match=r"resnet20 has no trained weights\. Networks with weights: simple_cnn\."):
        torch.hub.load(str(REPO), "resnet20", source="local", pretrained=True)
    with pytest.raises(SystemExit) as exc:
        predict_main(["resnet20", __file__])
    assert exc.value.code == 2 and "Networks with weights: simple_cnn" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_main(["no_such_net.ckpt", __file__])
    assert "Or name a network with trained weights: simple_cnn." in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown architecture 'resnet21'"):
        create_model("resnet21", pretrained=True)


def test_a_manifest_entry_must_carry_its_hash_in_the_file_name(weights):
    manifest = json.loads((weights / "manifest.json").read_text())
    entry = manifest["weights"][ARCH]
    renamed = f"{ARCH}-{'0' * 10}.pt"
    (weights / entry["file"]).rename(weights / renamed)
    entry["file"] = renamed
    (weights / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="does not carry the first 10 hex digits of its sha256"):
        create_model(ARCH, pretrained=True)


def test_an_entry_with_a_url_is_downloaded_and_checked(weights, tmp_path, monkeypatch):
    """Where the file is not in the package, the entry's url serves it (here a file:// url)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    manifest = json.loads((weights / "manifest.json").read_text())
    entry = manifest["weights"][ARCH]
    host = tmp_path / "host"
    host.mkdir()
    (weights / entry["file"]).rename(host / entry["file"])
    entry["url"] = (host / entry["file"]).as_uri()
    (weights / "manifest.json").write_text(json.dumps(manifest))
    model = create_model(ARCH, pretrained=True)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / entry["file"]
    assert cached.is_file() and model.pretrained_cfg["sha256"] == entry["sha256"]
    damage(cached.parent, "changed byte")
    with pytest.raises(WeightsError, match="was changed"):
        create_model(ARCH, pretrained=True)


def test_no_weights_at_all_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    assert list_pretrained() == []
    with pytest.raises(WeightsError, match="no network has any yet"):
        create_model("resnet20", pretrained=True)


# ---------------------------------------------------------------------------------------------
# The model card and the package
# ---------------------------------------------------------------------------------------------


def test_the_card_gives_the_evidence_of_the_weights(published):
    folder, entry, _ = published
    card = (folder.parent / "models.md").read_text()
    assert card.endswith("\n".join(weights_markdown(read_manifest(folder))) + "\n")  # the card of these weights
    row = next(line for line in card.splitlines() if line.startswith(f"| `{ARCH}` | [`{RECIPE}`]"))
    acc = entry["test_acc"]
    assert f"{100 * acc['mean']:.2f}% ± {100 * acc['std']:.2f} (3)" in row and entry["sha256"] in row
    assert f"{entry['bytes'] / 2**20:.2f} MiB" in row and "1.0 min on" in row and entry["file"] in row
    assert "JPEG (quality 75) copy" in card and "original PNG test images is not measured here" in card
    assert "Not robust to corruptions beyond the figures in this card" in card


def test_the_committed_card_shows_the_shipped_weights():
    card = (REPO / "docs" / "models.md").read_text()
    assert "\n".join(weights_markdown(read_manifest(PACKAGE_WEIGHTS))) in card, (
        "docs/models.md is out of date: python scripts/model_card.py --output docs/models.md"
    )


def test_a_pip_install_ships_the_weights():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["cifar_lightning"].split(",")]
    shipped = [p.relative_to(PACKAGE_WEIGHTS.parent).as_posix() for p in PACKAGE_WEIGHTS.iterdir()]
    for name in [*shipped, "weights/resnet20-0123456789.pt", "weights/manifest.json"]:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name


# ---------------------------------------------------------------------------------------------
# The weights the package ships, entry by entry
# ---------------------------------------------------------------------------------------------

NONE_SHIPPED = (
    "the package ships no trained weights yet: cifar_lightning/weights/manifest.json lists none "
    "(scripts/publish_weights.py adds them from a recipe's kept runs; docs/weights.md)"
)


def shipped_params() -> list:
    names = list_pretrained(PACKAGE_WEIGHTS)
    return [pytest.param(n, id=n) for n in names] or [pytest.param(None, marks=pytest.mark.skip(reason=NONE_SHIPPED))]


@pytest.mark.parametrize("name", shipped_params())
def test_shipped_weights_load_through_the_hub(name, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    entry = read_manifest(PACKAGE_WEIGHTS)["weights"][name]
    data = (PACKAGE_WEIGHTS / entry["file"]).read_bytes()
    assert entry["file"] == f"{name}-{hashlib.sha256(data).hexdigest()[:10]}.pt" and len(data) == entry["bytes"]
    model = torch.hub.load(str(REPO), name, source="local", pretrained=True)
    assert model.pretrained_cfg == entry and model.class_names == entry["class_names"]
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, entry["num_classes"])
    for key in ("recipe", "commit", "seeds", "shipped_seed", "selection_rule", "training", "provenance", "storage"):
        assert entry.get(key) is not None, key


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("name", shipped_params())
def test_shipped_weights_reproduce_their_test_accuracy(name, real_cifar10, monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    entry = read_manifest(PACKAGE_WEIGHTS)["weights"][name]
    shipped = entry["shipped"]
    report = evaluate_main(
        [
            name,
            "--data-dir",
            str(real_cifar10),
            "--output-dir",
            str(tmp_path),
            "--batch-size",
            str(shipped["batch_size"]),
            "--tta",
            shipped["tta"],
        ]
    )
    assert report["test_images"] == shipped["test_images"] == 10_000
    assert report["test_acc"] == shipped["test_acc"]
    assert (report.get("tta") or {}).get("test_acc") == shipped["test_acc_tta"]


@pytest.mark.slow
def test_a_reproduced_run_is_published_and_loaded_by_name(tiny_folder, tmp_path, monkeypatch):
    """The whole flow on what scripts/reproduce.py keeps (its report format, its checkpoint)."""
    from benchmarks.reproduce import run_recipe

    configs, results, weights = tmp_path / "configs", tmp_path / "results", tmp_path / "weights"
    configs.mkdir()
    (configs / "tiny_run.yaml").write_text(
        "# tiny_run: simple_cnn for one epoch on a tiny folder.\nmodel:\n  arch: simple_cnn\n  lr: 0.01\n"
        "data:\n  batch_size: 8\n  val_size: 0\n  num_workers: 0\ntrainer:\n  max_epochs: 1\n"
    )
    run_recipe(
        configs / "tiny_run.yaml",
        0,
        str(tiny_folder),
        results,
        ["--trainer.enable_progress_bar=false"],
        keep_checkpoint=True,
    )
    args = [
        "tiny_run",
        "--data-dir",
        str(tiny_folder),
        "--results",
        str(results),
        "--configs",
        str(configs),
        "--weights-dir",
        str(weights),
        "--corruptions",
        "0",
    ]
    (entry,) = publish_weights.main(args)
    assert entry["commit"] and entry["training"]["machine"]["cpu"] and entry["training"]["val_size"] == 0
    assert entry["test_acc"]["n"] == 1 and entry["test_acc"]["std"] is None
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    report = evaluate_main(
        [
            "simple_cnn",
            "--data-dir",
            str(tiny_folder),
            "--output-dir",
            str(tmp_path / "eval"),
            "--batch-size",
            str(entry["shipped"]["batch_size"]),
        ]
    )
    assert report["test_acc"] == entry["shipped"]["test_acc"]


def _epoch_lines(first: int, last: int, seconds: float) -> str:
    return "".join(
        f"epoch {e}/4  train loss 1.0000 acc 50.00%  lr 0.1  {seconds} s  eta 0:00\n" for e in range(first, last + 1)
    )


def test_a_resumed_run_is_timed_over_its_parts(tmp_path):
    # Epochs 1-2 in the first part, 3 in the second, 4 in the log of the part that finished.
    (tmp_path / "r-seed0-part1.log").write_text("$ python -m cifar_lightning.fit\n" + _epoch_lines(1, 2, 100.0))
    (tmp_path / "r-seed0-part2.log").write_text(_epoch_lines(3, 3, 50.5))
    (tmp_path / "r-seed0.log").write_text(_epoch_lines(4, 4, 20.0) + "Test results: x on 10 images\n")
    parts = reproduce.run_parts(tmp_path, "r", 0)
    assert [(p["log"], p["epochs"], p["seconds"]) for p in parts] == [
        ("r-seed0-part1.log", [1, 2], 200.0),
        ("r-seed0-part2.log", [3, 3], 50.5),
        ("r-seed0.log", [4, 4], 20.0),
    ]
    assert reproduce.fit_seconds({"fit_seconds": 20.0}, parts) == 270.5
    # A run without part logs keeps its report's time.
    assert reproduce.run_parts(tmp_path, "other", 0) == []
    assert reproduce.fit_seconds({"fit_seconds": 20.0}, []) == 20.0
    # A part missing (epoch 3 never trained) is refused, not summed.
    (tmp_path / "r-seed0-part2.log").unlink()
    with pytest.raises(UserError, match="do not train epochs 1, 2, ... once each"):
        reproduce.run_parts(tmp_path, "r", 0)


def test_the_readme_lists_every_shipped_weight_with_its_manifest_figures():
    # One row per manifest entry, its figures those of the shipped file; a file published again
    # without the README fails here.
    readme = (REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `") and line.endswith("MiB |")]
    expected = []
    for name, e in sorted(read_manifest(PACKAGE_WEIGHTS)["weights"].items()):
        shipped = e["shipped"]
        tta = f"{100 * shipped['test_acc_tta']:.2f}%" if shipped.get("test_acc_tta") is not None else "-"
        expected.append(
            f"| `{name}` | `{e['recipe']}` | {tta} | {100 * shipped['test_acc']:.2f}% | {e['test_acc']['n']} "
            f"| {e['bytes'] / 2**20:.2f} MiB |"
        )
    assert rows == expected
