"""scripts/bench.py --quick: every section runs end to end on tiny data and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, write_image_folder

from benchmarks.bench import main, summary_rows
from benchmarks.bench_airbench import write_airbench_data
from benchmarks.bench_memory import MemorySampler
from benchmarks.bench_speed import BenchConfig


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_quick_bench_writes_its_json(tmp_path, capsys):
    # In-process, every section but memory, whose two child fits take most of a minute (the slow
    # test below runs them all through scripts/bench.py).
    out = tmp_path / "quick.json"
    returned = main(["--quick", "--sections", "data,overhead,time_to_accuracy,layout", "--output", str(out)])
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["meta"]["quick"] is True and results["meta"]["complete"] is True
    assert results["provenance"]["machine"]["cpu_cores"] >= 1 and results["provenance"]["command"].startswith("python")
    check_data(results["data"])
    check_overhead(results["overhead"])
    check_time_to_accuracy(results["time_to_accuracy"])
    check_layout(results["layout"])
    printed = capsys.readouterr().out
    assert "time to accuracy" in printed and "overhead" in printed  # the rich table


@pytest.mark.slow
def test_quick_bench_every_section(tmp_path):
    out = tmp_path / "quick.json"
    proc = run_bench("--quick", "--sections", "all", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    check_data(results["data"])
    check_overhead(results["overhead"])
    check_time_to_accuracy(results["time_to_accuracy"])
    check_memory(results["memory"])
    check_tricks(results["tricks"])
    check_layout(results["layout"])


def check_data(data):
    for key in ("tensor_loader", "array_pil_loader_2_workers", "imagefolder_pil_2_workers"):
        assert data[key]["images_per_s"] > 0
    assert data["speedup"] == pytest.approx(
        data["tensor_loader"]["images_per_s"] / data["imagefolder_pil_2_workers"]["images_per_s"], rel=0.02
    )
    assert data["target_speedup"] == 20
    presets = data["presets"]
    assert set(presets["presets"]) == {"standard", "autoaugment", "randaugment", "trivialaugment"}
    for row in presets["presets"].values():
        assert row["tensor_loader_images_per_s"] > 0 and row["per_image_2_workers_images_per_s"] > 0
        assert row["tensor_over_per_image"] == pytest.approx(
            row["tensor_loader_images_per_s"] / row["per_image_2_workers_images_per_s"], rel=0.02
        )
    for row in presets["presets"].values():  # each against crop + flip of the same run
        assert row["tensor_over_standard_tensor"] == pytest.approx(
            row["tensor_loader_images_per_s"] / data["tensor_loader"]["images_per_s"], rel=0.02
        )
    assert presets["policy_over_resnet20_training"] == pytest.approx(
        presets["presets"]["trivialaugment"]["tensor_loader_images_per_s"] / presets["resnet20_training_images_per_s"],
        rel=0.02,
    )


def check_overhead(overhead):
    variants = {"terminal", "defaults", "no_progress_bar", "bare_trainer", "lightning_floor"}
    assert set(overhead["paired_steps_per_s"]) == {"bare_loop"} | variants
    assert overhead["ratio"] > 0 and overhead["target_ratio"] == 0.95
    met = overhead["ratio"] >= 0.95 and overhead["framework_ms_per_step"]["defaults"] <= overhead["target_framework_ms"]
    assert overhead["met"] is met
    # every timed step of every fit has a bare step beside it
    assert overhead["pairs"] == overhead["timed_steps"] * overhead["repeats"]
    ms, se = overhead["framework_ms_per_step"], overhead["framework_ms_standard_error"]
    ordered = all(
        ms[b] <= ms[a] + 2 * (se[a] + se[b]) + 2e-3
        for a, b in [
            ("terminal", "defaults"),
            ("defaults", "no_progress_bar"),
            ("no_progress_bar", "bare_trainer"),
            ("bare_trainer", "lightning_floor"),
        ]
    )
    assert overhead["ordered"] is ordered or abs(ms["defaults"] - ms["no_progress_bar"]) < 2e-3
    assert overhead["ours_ms_per_step"] == pytest.approx(ms["defaults"] - ms["lightning_floor"], abs=2e-3)
    assert overhead["ours_met"] is (overhead["ours_ms_per_step"] <= overhead["target_ours_ms"] == 0.25)
    target_ms = overhead["target_framework_ms"]
    assert overhead["target_below_lightning_floor"] is (target_ms is not None and ms["lightning_floor"] > target_ms)
    assert "null_ms_per_step" in overhead and overhead["null_ms_standard_error"] >= 0
    groups = overhead["profile"]["groups"]
    assert sum(g["share"] for g in groups.values()) == pytest.approx(1, abs=0.01)
    assert groups["Lightning's loop, hooks and strategy"]["calls_per_step"] > 0
    assert groups["this package (module, callbacks, data)"]["calls_per_step"] > 0  # training_step, the loader


def check_time_to_accuracy(section):
    runners = {r["runner"] for r in section["runs"]}
    assert runners == {"airbench94", "fastnet", "fastnet_muon"}, runners  # airbench is in the dev extra
    ours = [r for r in section["runs"] if r["runner"] != "airbench94"]
    assert all(r["tta"] == "flip_translate" and r["epochs"] == 1 and r["seconds"] > 0 for r in ours)
    airbench = next(r for r in section["runs"] if r["runner"] == "airbench94")
    assert airbench["precision"] == "fp32" and airbench["steps"] > 0 and 0 <= airbench["test_acc"] <= 1
    vs = section["summary"]["fastnet"]["against_airbench94"]
    mine = next(r for r in ours if r["runner"] == "fastnet")
    assert vs["time_ratio"] == pytest.approx(mine["seconds"] / airbench["seconds"], rel=1e-3)
    assert vs["accuracy_difference_points"] == pytest.approx(100 * (mine["test_acc"] - airbench["test_acc"]), abs=1e-3)


def check_memory(memory):
    assert memory["torchvision_2_workers"]["max_workers_seen"] >= 2
    assert memory["torchvision_0_workers"]["workers"] == 0
    assert memory["torchvision_2_workers"]["pss_total_mb"] > 0 and "workers_extra_over_dataset" in memory


def check_airbench_order(train: dict, n_classes: int) -> None:
    """airbench whitens from the first tenth of its training file (5,000 of 50,000): every class is
    there, none fills half of it, as in CIFAR-10's own files. A class-ordered file fails."""
    labels = train["labels"]
    first = labels[: len(labels) // 10]
    counts = torch.bincount(first, minlength=n_classes)
    assert (counts > 0).all() and counts.max() <= len(first) // 2, counts.tolist()


def test_one_writer_of_airbench_files_in_one_seeded_shuffled_order(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=100, n_test=2)
    written = write_airbench_data(str(data), tmp_path / "a")
    again = write_airbench_data(str(data), tmp_path / "b")
    train, test = (torch.load(tmp_path / "a" / "cifar10" / f"{s}.pt") for s in ("train", "test"))
    assert written["images"] == {"train": 300, "test": 6} and written["classes"] == ["cat", "dog", "frog"]
    assert train["images"].dtype == torch.uint8 and tuple(train["images"].shape) == (300, 32, 32, 3)
    check_airbench_order(train, 3)
    # Every image keeps its label: the class is in its bright channel (synthetic.labelled_image).
    bright = train["images"].float().mean(dim=(1, 2)).argmax(dim=1)
    assert torch.equal(bright, train["labels"] % 3)
    # One order, the same on every machine and every call; the test images as the folder lists them.
    assert torch.equal(torch.load(tmp_path / "b" / "cifar10" / "train.pt")["labels"], train["labels"])
    assert again["train_order"] == written["train_order"]
    assert torch.equal(test["labels"], torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(AssertionError):  # the check sees a class-ordered file
        check_airbench_order({"labels": test["labels"].repeat_interleave(20)}, 3)


def test_memory_sampler_sums_a_process_tree():
    # A child that forks a grandchild, each then writing its own 64 MB: the sampler sees both.
    code = (
        "import os, time\n"
        "b = bytearray(64 * 2**20)\n"
        "pid = os.fork()\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        "time.sleep(1.5)\n"
        "if pid: os.waitpid(pid, 0)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    sampler = MemorySampler(proc.pid, interval=0.05)
    sampler.start()
    proc.wait()
    sampler.stop()
    assert sampler.max_workers == 1 and sampler.peak["workers"] == 1
    assert sampler.peak["pss_total_mb"] > 120 and sampler.peak["workers_private_mb"] > 60


def test_recipes_train_on_the_images_they_were_sized_for(tmp_path):
    from benchmarks.bench_time_to_accuracy import recipe_steps

    # the same images as the recipe's own run: 11 epochs of the 45,000 images its 5,000 held out
    # leave (fastnet, batch 1024), 8 of them for fastnet_muon (batch 2000), within one batch
    for name, epochs, batch in (("fastnet", 11, 1024), ("fastnet_muon", 8, 2000)):
        steps = recipe_steps(REPO / "configs" / f"{name}.yaml", 50_000)
        assert abs(steps * batch - epochs * 45_000) <= batch / 2, (name, steps)
    (tmp_path / "r.yaml").write_text("trainer:\n  max_epochs: 2\ndata:\n  batch_size: 100\n")  # val_size 0.1
    assert recipe_steps(tmp_path / "r.yaml", 1000) == 18
    (tmp_path / "s.yaml").write_text("trainer:\n  max_steps: 5\n")
    assert recipe_steps(tmp_path / "s.yaml", 1000) is None


def test_compare_to_baseline_pairs_seeds():
    from benchmarks.bench_time_to_accuracy import compare_to_baseline

    def run(runner, seed, acc, secs):
        return {"runner": runner, "seed": seed, "test_acc": acc, "seconds": secs, "images_seen": 1000}

    runs = [
        run("airbench94", 0, 0.90, 100),
        run("a", 0, 0.91, 80),
        run("airbench94", 1, 0.92, 200),
        run("a", 1, 0.91, 180),
    ]
    out = compare_to_baseline(runs)
    vs = out["a"]["against_airbench94"]
    assert vs["seeds"] == [0, 1] and vs["time_ratio"] == pytest.approx((0.8 + 0.9) / 2)
    assert vs["accuracy_difference_points"] == pytest.approx(0.0, abs=1e-9)
    assert vs["accuracy_difference_std"] == pytest.approx(2**0.5, abs=1e-3)  # diffs +1 and -1 points
    assert out["airbench94"]["n"] == 2 and "against_airbench94" not in out["airbench94"]


def test_seeds_run_apart_merge_into_one_comparison(tmp_path, capsys):
    from benchmarks.provenance import provenance

    def run(runner, seed, acc, secs):
        return {"runner": runner, "seed": seed, "test_acc": acc, "seconds": secs, "images_seen": 1000}

    def result(name, runs, key="time_to_accuracy", data="copy.tar.gz", busy=False):
        prov = provenance(None, argv=["scripts/bench.py"]) | {"data": {"name": data}, "machine_busy": busy}
        section = {"runners": ["airbench94", "a"], "seeds": sorted({r["seed"] for r in runs}), "runs": runs}
        path = tmp_path / name
        path.write_text(json.dumps({"provenance": prov, "meta": {"complete": True}, key: section}))
        return str(path)

    first = result("seed0.json", [run("airbench94", 0, 0.90, 100), run("a", 0, 0.91, 80)], key="tta", busy=True)
    second = result("seed1.json", [run("a", 1, 0.91, 180), run("airbench94", 1, 0.92, 200)])
    out = tmp_path / "merged.json"
    merged = main(["--merge", first, second, "--output", str(out)])
    assert json.loads(out.read_text())["time_to_accuracy"]["summary"] == merged["time_to_accuracy"]["summary"]
    section = merged["time_to_accuracy"]
    assert section["seeds"] == [0, 1] and [r["seed"] for r in section["runs"]] == [0, 0, 1, 1]
    vs = section["summary"]["a"]["against_airbench94"]  # as if both seeds had run in one file
    assert vs["seeds"] == [0, 1] and vs["time_ratio"] == pytest.approx(0.85) and vs["time_ratio_std"] > 0
    assert vs["accuracy_difference_std"] == pytest.approx(2**0.5, abs=1e-3)
    assert [s["file"] for s in merged["sources"]] == ["<outside>/seed0.json", "<outside>/seed1.json"]
    assert merged["provenance"]["machine_busy"] is True  # one source ran on a busy machine
    assert merged["provenance"]["data"] == {"name": "copy.tar.gz"}
    assert "time to accuracy: a, 2 seed(s)" in capsys.readouterr().out
    # the same seed twice, or another data copy, is one clear error (argparse's exit code 2)
    for bad, says in ((first, "appears twice"), (result("other.json", [run("a", 2, 0.9, 1)], data="x"), "differ")):
        with pytest.raises(SystemExit) as exit_:
            main(["--merge", first, bad, "--output", str(tmp_path / "bad.json")])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()


def test_summary_rows_and_configs():
    assert summary_rows({"meta": {}}) == []
    row = {
        "tensor_loader_images_per_s": 9000.0,
        "per_image_2_workers_images_per_s": 3000.0,
        "tensor_over_per_image": 3.0,
        "tensor_over_standard_tensor": 0.2,
    }
    data = {
        "batch_size": 512,
        "tensor_loader": {"images_per_s": 45000.0},
        "imagefolder_pil_2_workers": {"images_per_s": 2000.0},
        "array_pil_loader_2_workers": {"images_per_s": 4000.0},
        "speedup": 22.5,
        "speedup_over_array_pil": 11.25,
        "target_speedup": 20.0,
        "presets": {
            "presets": {"trivialaugment": row},
            "resnet20_training_images_per_s": 600.0,
            "policy_over_resnet20_training": 15.0,
        },
    }
    rows = summary_rows({"data": data})
    policy = next(r for r in rows if r[0].startswith("data: trivialaugment, tensor loader"))
    assert policy[1:] == ("9,000 vs 3,000 img/s", "3.0x", ">= 10x") and "0.20x" in policy[0]
    assert next(r for r in rows if "resnet20 training (600 img/s)" in r[0])[2:] == ("15.0x", ">= 5x")
    quick = BenchConfig.quick_config(data_dir="x")
    assert quick.quick and quick.data_dir == "x" and quick.val_size < 100
    assert BenchConfig().seeds == [0] and BenchConfig().val_size == 5000


def test_overhead_method_sees_a_known_cost(tmp_path):
    # A callback that spends 3 ms in every other step must read as 3 ms more framework time on
    # those steps than on the others of the same fit, and two identical bare loops as none: the
    # method measures what is there, no more. (Within one fit, so that a busy machine, other test
    # workers included, reaches both halves alike; medians, for the steps it stalls.)
    import time as _time

    import numpy as np
    import torch
    from lightning.pytorch.callbacks import Callback

    from benchmarks.bench_overhead import _interleaved_fit, _interleaved_null
    from cifar_lightning.data.synthetic import write_image_folder

    class Spend(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            until = _time.perf_counter() + 3e-3 * (batch_idx % 2)
            while _time.perf_counter() < until:
                pass

    data = write_image_folder(tmp_path / "data", n_train=400, n_test=4)
    cfg = BenchConfig.quick_config(data_dir=str(data), val_size=16, warmup_steps=4, timed_steps=80)
    cpu = torch.device("cpu")
    timing = _interleaved_fit(cfg, "simple_cnn", 8, cpu, "bare_trainer", extra_callbacks=(Spend(),))
    diff = 1e3 * (np.asarray(timing["fit"]) - np.asarray(timing["bare"]))  # step i is batch warmup + i
    spent, plain = np.median(diff[1::2]), np.median(diff[0::2])  # warm-up 4: odd i, odd batches
    assert spent - plain == pytest.approx(3.0, abs=0.75)
    null = _interleaved_null(cfg, "simple_cnn", 8, cpu)
    assert abs(float(np.median(1e3 * (np.asarray(null["fit"]) - np.asarray(null["bare"]))))) < 0.75


def test_tricks_clock_counts_what_happens_before_the_step(tiny_folder, tmp_path, monkeypatch):
    # A known cost where the mixing runs, after the transfer and before Lightning's batch start:
    # the section's clock must see it whole.
    from benchmarks.bench_tricks import _trick_fit
    from cifar_lightning.data import CIFAR10DataModule

    cfg = BenchConfig.quick_config(data_dir=str(tiny_folder), val_size=6, tricks_batch_size=6, tricks_steps=3)
    plain = _trick_fit(cfg, [], tmp_path / "plain")
    transfer = CIFAR10DataModule.on_after_batch_transfer

    def slow_transfer(self, batch, dataloader_idx):
        if self.trainer is not None and self.trainer.training:
            time.sleep(0.5)
        return transfer(self, batch, dataloader_idx)

    monkeypatch.setattr(CIFAR10DataModule, "on_after_batch_transfer", slow_transfer)
    slowed = _trick_fit(cfg, [], tmp_path / "slowed")
    assert plain["images"] == slowed["images"] == 3 * 6
    # 1.5 s more: a clock started at the batch's start would see none of it.
    assert slowed["seconds"] - plain["seconds"] > 1.0, (plain, slowed)
    assert slowed["images_per_s"] == pytest.approx(slowed["images"] / slowed["seconds"], rel=0.01)


def check_tricks(section):
    from benchmarks.fitting import TRICKS

    rows = section["tricks"]
    assert set(rows) == set(TRICKS) and rows["standard"]["over_standard"] == 1.0
    for row in rows.values():
        assert row["images"] == section["timed_steps"] * section["batch_size"] and row["seconds"] > 0
        assert row["over_standard"] == pytest.approx(row["images_per_s"] / rows["standard"]["images_per_s"], rel=0.01)
        if section["rounds"] == 1:  # one round has no spread: no ratio is beyond it
            assert row["noise"] is None and row["beyond_noise"] is False


def test_a_tricks_ratio_inside_the_runs_own_spread_reads_as_noise():
    from benchmarks.bench import summary_rows
    from benchmarks.bench_tricks import mark_noise

    rows = {
        "standard": {"images_per_s": 400.0, "rounds_images_per_s": [400.0, 300.0]},  # 25% apart
        "cutout": {"images_per_s": 450.0, "rounds_images_per_s": [450.0, 440.0]},  # 1.125x: inside 25%
        "sam": {"images_per_s": 200.0, "rounds_images_per_s": [200.0, 198.0]},  # 0.5x: beyond it
    }
    mark_noise(rows)
    assert rows["cutout"]["noise"] == 0.25 and not rows["cutout"]["beyond_noise"]
    assert rows["sam"]["beyond_noise"] and rows["sam"]["over_standard"] == 0.5
    printed = {
        r[0].split()[1]: r[2] for r in summary_rows({"tricks": {"arch": "resnet20", "batch_size": 128, "tricks": rows}})
    }
    assert printed == {"standard": "1.00x", "cutout": "within noise", "sam": "0.50x"}


def test_lightning_floor_fits_nothing_of_this_package(tmp_path):
    # The floor is Lightning's loop alone: a module that is not ours, no logger, and no callback
    # but those the method passes; the network is the bare loop's, from the same seed.
    import torch
    from lightning.pytorch.callbacks import Callback

    from benchmarks.bench_overhead import BareLoop, _interleaved_fit
    from cifar_lightning.data.synthetic import write_image_folder
    from cifar_lightning.module import ClassifierModule

    seen = {}

    class Look(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(
                module=pl_module,
                logger=trainer.logger,
                callbacks=list(trainer.callbacks),
                weights=[p.detach().clone() for p in pl_module.parameters()],
            )

    data = write_image_folder(tmp_path / "data", n_train=80, n_test=4)
    cfg = BenchConfig.quick_config(data_dir=str(data), val_size=16, warmup_steps=1, timed_steps=4)
    look = Look()
    timing = _interleaved_fit(cfg, "simple_cnn", 8, torch.device("cpu"), "lightning_floor", extra_callbacks=(look,))
    assert len(timing["fit"]) == 4 and len(timing["bare"]) == 4
    assert not isinstance(seen["module"], ClassifierModule) and seen["logger"] is None
    assert seen["callbacks"][0] is look and len(seen["callbacks"]) == 2  # and the interleaved timer
    bare = list(BareLoop(cfg, "simple_cnn", 8, torch.device("cpu"), 5).model.parameters())
    assert len(seen["weights"]) == len(bare) > 0
    assert all(torch.equal(a, b) for a, b in zip(seen["weights"], bare))


def check_layout(section):
    from benchmarks.bench_layout import QUICK_NETWORKS, verdict

    assert set(section["networks"]) == set(QUICK_NETWORKS)
    for row in section["networks"].values():
        assert len(row["speedups"]) == section["rounds"] and row["nchw_ms"] > 0 and row["channels_last_ms"] > 0
        assert row["verdict"] == verdict(row["speedups"])
    wins = {f for f, v in section["families"].items() if set(v.values()) == {"wins"}}
    assert set(section["families_that_win"]) == wins


def test_layout_verdicts_need_three_rounds_in_four():
    from benchmarks.bench_layout import verdict

    assert verdict([1.2, 1.1, 1.3, 1.15]) == "wins"
    assert verdict([1.2, 1.1, 0.8, 1.15]) == "wins"  # three rounds in four
    assert verdict([1.2, 0.9, 0.8, 1.15]) == "within noise"  # half the rounds the other way
    assert verdict([0.8, 0.9, 0.85, 0.95]) == "loses"
