"""How far to trust a model: calibration (ECE, temperature scaling) and accuracy under corruptions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import labelled_image
from test_evaluate import assert_png, trained_run
from wandb_records import summarize

from cifar_lightning import corruptions as corruptions_mod
from cifar_lightning.calibration import calibration_metrics, fit_temperature, reliability_bins
from cifar_lightning.corruptions import CORRUPTIONS, LEFT_OUT, corrupt, corrupted_set
from cifar_lightning.errors import UserError
from cifar_lightning.evaluation import default_output_dir, evaluate_main
from cifar_lightning.predict import predict_main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def overconfident_logits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits right about 70% of the time, scaled so the model claims far more certainty than that."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    logits = torch.randn(n, 10, generator=g)
    logits[torch.arange(n), labels] += 2.2
    return 6.0 * logits, labels


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    val_logits, val_labels = overconfident_logits(4000, seed=0)
    test_logits, test_labels = overconfident_logits(4000, seed=1)  # fitted on one set, judged on another
    before = calibration_metrics(test_logits, test_labels)
    temperature = fit_temperature(val_logits, val_labels)
    after = calibration_metrics(test_logits, test_labels, temperature)
    assert 0.6 < before["accuracy"] < 0.8 and before["ece"] > 0.15  # claims ~100%, is right ~70%
    assert temperature > 2  # the logits were inflated 6-fold
    assert after["ece"] < before["ece"] / 3 and after["nll"] < before["nll"] and after["brier"] < before["brier"]
    assert after["accuracy"] == before["accuracy"]  # scaling changes no prediction


def test_reliability_bins_add_up_to_the_ece():
    logits, labels = overconfident_logits(2000, seed=2)
    bins = reliability_bins(logits, labels)
    assert sum(b["count"] for b in bins) == 2000 and len(bins) == 15
    ece = sum(b["count"] / 2000 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert ece == pytest.approx(calibration_metrics(logits, labels)["ece"], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Corruptions
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([labelled_image(i % 3, rng) for i in range(12)])


#: The corruptions that draw random numbers (noise, jitter, angles, flakes, haze, displacement).
RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "fog",
    "elastic_transform",
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corruptions_are_identical_for_the_same_seed(images, corruption):
    first = corrupt(images, corruption, 3, seed=7)
    assert first.dtype == np.uint8 and first.shape == images.shape
    assert np.array_equal(first, corrupt(images, corruption, 3, seed=7))
    assert not np.array_equal(first, images)
    if corruption in RANDOM:  # the seed is what draws them
        assert not np.array_equal(first, corrupt(images, corruption, 3, seed=8))


@pytest.mark.data
def test_each_corruption_changes_real_images_more_as_severity_rises(real_subset):
    from cifar_lightning.data import CIFAR10DataModule

    clean, _ = CIFAR10DataModule(data_dir=str(real_subset), download=False).split_arrays("test")  # 200 images
    for corruption in CORRUPTIONS:
        rmse = [np.sqrt(((corrupt(clean, corruption, s).astype(float) - clean) ** 2).mean()) for s in range(1, 6)]
        assert all(np.diff(rmse) > 0), (corruption, rmse)


def test_frost_is_named_as_left_out():
    assert "frost" in LEFT_OUT and "frost" not in CORRUPTIONS and len(CORRUPTIONS) == 15


def test_corrupted_arrays_are_cached(images, tmp_path, monkeypatch):
    first = corrupted_set(images, ("fog", "contrast"), (1, 5), seed=0, cache_dir=tmp_path)
    monkeypatch.setattr(corruptions_mod, "corrupt", lambda *a: pytest.fail("computed again instead of read"))
    again = corrupted_set(images, ("fog", "contrast"), (1, 5), seed=0, cache_dir=tmp_path)
    assert all(np.array_equal(first[k], again[k]) for k in first)


# ---------------------------------------------------------------------------------------------
# scripts/evaluate.py --calibration --corruptions, predict.py --calibrated, dashboards
# ---------------------------------------------------------------------------------------------


def test_evaluate_calibration_and_corruptions(run, tmp_path):
    ckpt, _ = run
    out = tmp_path / "eval"
    report = evaluate_main(
        [
            str(ckpt),
            "--calibration",
            "--corruptions",
            "--corruptions-subset",
            "10",
            "--output-dir",
            str(out),
            "--logger",
            "tensorboard",
        ]
    )
    assert_png(out / "reliability.png")
    assert_png(out / "corruptions.png")
    cal = report["calibration"]
    assert cal["fitted_on"] == "validation split (6 images)"  # the checkpoint's validation split, not the test set
    assert cal["temperature"] > 0 and {"ece", "nll", "brier"} <= set(cal["before"]) == set(cal["after"])
    cor = report["corruptions"]
    assert cor["images"] == 10 and set(cor["accuracy"]) == set(CORRUPTIONS)
    assert all(len(row) == 5 and all(0 <= a <= 1 for a in row) for row in cor["accuracy"].values())
    assert cor["mean_accuracy"] == pytest.approx(np.mean(list(cor["accuracy"].values())))
    assert json.loads((out / "report.json").read_text())["calibration"]["temperature"] == cal["temperature"]
    # the run's TensorBoard folder got the figures and numbers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(ckpt.parent.parent / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"eval/reliability", "eval/corruptions"} <= set(events.Tags()["images"])
    assert "eval/ece_after_scaling" in events.Tags()["scalars"]


def test_evaluate_sends_figures_and_numbers_to_wandb(run, tmp_path):
    ckpt, _ = run
    evaluate_main(
        [
            str(ckpt),
            "--calibration",
            "--corruptions",
            "--corruptions-subset",
            "10",
            "--output-dir",
            str(tmp_path / "eval"),
            "--logger",
            "wandb",
        ]
    )
    (run_file,) = sorted((ckpt.parent.parent / "wandb").glob("offline-run-*/run-*.wandb"))[-1:]
    logged = summarize(run_file)
    assert {"eval/ece_before_scaling", "eval/ece_after_scaling", "eval/temperature"} <= logged["history_keys"]
    assert {"eval/corruption_mean_acc", "eval/corruption_relative_drop", "eval/corruption_acc/fog"} <= logged[
        "history_keys"
    ]
    # the figures, as W&B images
    assert {"eval/reliability/_type", "eval/corruptions/_type"} <= logged["history_keys"]


def test_calibration_needs_a_validation_split(run, tmp_path, capsys):
    ckpt, _ = run
    stored = torch.load(ckpt, weights_only=True)
    stored["datamodule_hyper_parameters"]["val_size"] = 0
    torch.save(stored, tmp_path / "no_val.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([str(tmp_path / "no_val.ckpt"), "--calibration", "--output-dir", str(tmp_path / "e")])
    assert exit_info.value.code == 2 and "--val-size 0" in capsys.readouterr().err


def test_predict_calibrated_uses_the_stored_temperature(run, tmp_path):
    ckpt, data = run
    image = str(sorted((data / "test" / "dog").glob("*.png"))[0])
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"calibration": {"temperature": 4.0}}))
    plain, calibrated = tmp_path / "plain.json", tmp_path / "calibrated.json"
    assert predict_main([str(ckpt), image, "--output", str(plain)]) == 0
    assert predict_main([str(ckpt), image, "--output", str(calibrated), "--calibrated", str(report)]) == 0
    p = json.loads(plain.read_text())[0]["predictions"]
    c = json.loads(calibrated.read_text())[0]["predictions"]
    assert [x["class"] for x in p] == [x["class"] for x in c]  # same ranking
    assert c[0]["probability"] < p[0]["probability"]  # a temperature above 1 tempers the top class
    with pytest.raises(UserError, match="--calibration first"):
        from cifar_lightning.predict import calibrated_temperature

        calibrated_temperature(str(tmp_path / "elsewhere" / "x.ckpt"), "auto")
    assert default_output_dir(ckpt).name == ckpt.stem
