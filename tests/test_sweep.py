"""Sweeps: the sweep file's checks, trials as ordinary runs, pruning, failures, a study that
continues, one test of the best configuration, and several workers on one study."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO, write_image_folder

from cifar_lightning.sweep import load_sweep
from cifar_lightning.sweep.runner import main as sweep_main

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
FIT = [
    "--arch",
    "simple_cnn",
    "--batch-size",
    "8",
    "--num-workers",
    "0",
    "--val-size",
    "12",
    "--augment",
    "flip",
    *QUIET,
]
GOOD, HOPELESS, DIVERGES = 0.02, 1.0e-7, 1.0e4


def write_sweep(path: Path, **overrides) -> Path:
    """A sweep of simple_cnn's learning rate over three choices, on a tiny folder."""
    sweep = {
        "metric": "val/acc",
        "direction": "maximize",
        "n_trials": 3,
        "fit_args": [*FIT, "--epochs", "3"],
        "space": {"model.lr": {"type": "categorical", "choices": [GOOD, HOPELESS, DIVERGES]}},
        "sampler": {"type": "tpe", "seed": 0},
        "pruner": {"type": "median", "n_startup_trials": 1},
    } | overrides
    path.write_text(yaml.safe_dump(sweep))
    return path


def enqueue(out: Path, study: str, *lrs: float) -> str:
    """Create the study in its default storage with these trials first in line; returns the URL."""
    (out / study).mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{(out / study / 'study.db').resolve()}"
    s = optuna.create_study(study_name=study, storage=url, direction="maximize", load_if_exists=True)
    for lr in lrs:
        s.enqueue_trial({"model.lr": lr})
    return url


def trials(out: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    url = f"sqlite:///{(out / study / 'study.db').resolve()}"
    return optuna.load_study(study_name=study, storage=url).get_trials()


def run_worker(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "sweep.py"), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# The sweep file
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"space": {"model.lr": {"type": "float", "low": 0.5, "high": 0.1}}}, "low (0.5) must be below high (0.1)"),
        ({"space": {"model.lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}}, "space.model.lr"),
        ({"space": {"lr": {"type": "float", "low": 0.01, "high": 0.1}}}, "'lr' is not a CLI name"),
        ({"space": {"model.lr": {"type": "gaussian"}}}, "type float, int or categorical"),
        ({"space": {"model.lr": {"type": "float", "low": 0.01, "high": 0.1, "logg": True}}}, "unknown key 'logg'"),
        ({"space": {"data.augment": {"type": "categorical", "choices": []}}}, "choices must be a non-empty list"),
        ({"metric": "test/acc"}, "never the test set"),
        ({"direction": "up"}, "maximize or minimize"),
        ({"pruner": {"type": "median", "patience": 3}}, "pruner"),
        ({"sampler": {"type": "cmaes"}}, "type must be one of tpe, random"),
        ({"n_trials": 0}, "a positive whole number"),
        ({"epochs": 3}, "unknown key 'epochs'"),
        ({"recipe": "no_such.yaml"}, "no recipe"),
    ],
    ids=[
        "empty-range",
        "log-of-zero",
        "not-a-cli-name",
        "bad-type",
        "bad-param-key",
        "no-choices",
        "test-metric",
        "direction",
        "pruner-args",
        "sampler",
        "n-trials",
        "top-key",
        "recipe",
    ],
)
def test_a_bad_sweep_file_is_one_clear_error(change, message, tmp_path):
    path = write_sweep(tmp_path / "bad.yaml", **change)
    with pytest.raises(Exception) as exc:
        load_sweep(path)
    assert type(exc.value).__name__ == "UserError" and message in str(exc.value), str(exc.value)


@pytest.mark.parametrize(
    "space, message",
    [
        ({"model.lrr": {"type": "float", "low": 0.01, "high": 0.1}}, "model.lrr"),
        ({"model.lr": {"type": "categorical", "choices": ["fast"]}}, "model.lr"),
        ({"model.lr": {"type": "float", "low": 0.0, "high": 0.1}}, "the learning rate must be positive, got 0.0"),
        ({"data.augment": {"type": "categorical", "choices": ["standard", "sideways"]}}, "sideways"),
    ],
    ids=["unknown-key", "wrong-type", "refused-value", "unknown-choice"],
)
def test_space_values_the_cli_refuses_stop_before_any_trial(space, message, tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    path = write_sweep(tmp_path / "bad.yaml", space=space)
    with pytest.raises(SystemExit) as exc:
        sweep_main([str(path), "--data-dir", str(data), "--output-dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "does not parse" in err or "is refused" in err, err
    assert message in err, err
    assert not (tmp_path / "out" / "bad" / "trials").exists() and not (tmp_path / "out" / "bad" / "study.db").exists()


def test_a_sweep_without_a_validation_split_is_refused(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    path = write_sweep(tmp_path / "noval.yaml", fit_args=[*FIT, "--val-size", "0"])
    with pytest.raises(SystemExit):
        sweep_main([str(path), "--data-dir", str(data), "--output-dir", str(tmp_path / "out")])
    assert "chooses on the validation split" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A study: trials, pruning, failures, results, the one test, continuing
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # about 90 s of trials on 2 cores
def test_a_study_prunes_hopeless_trials_records_failures_tests_once_and_continues(tmp_path, capsys):
    data, out = write_image_folder(tmp_path / "data"), tmp_path / "out"
    path = write_sweep(tmp_path / "lr.yaml")
    # In line: a good rate, a hopeless one (pruned after its first validation, against the
    # first's), one that diverges (its loss is lost: failed), then the good one again. Failed
    # trials take no place, so the study of 3 holds four trials.
    enqueue(out, "lr", GOOD, HOPELESS, DIVERGES, GOOD)
    args = [str(path), "--data-dir", str(data), "--output-dir", str(out)]
    summary = sweep_main(args)
    done = trials(out, "lr")
    assert [t.state.name for t in done] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    assert [t.params["model.lr"] for t in done] == [GOOD, HOPELESS, DIVERGES, GOOD]

    # Each trial is an ordinary run, with its number, study and state in its run directory.
    for t in done:
        run = Path(t.user_attrs["run_dir"])
        assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
        record = json.loads((run / "trial.json").read_text())
        assert record["trial"] == t.number and record["study"] == "lr"
        assert record["state"] == {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}[t.state.name]
    pruned = json.loads((Path(done[1].user_attrs["run_dir"]) / "trial.json").read_text())
    assert pruned["epoch"] == 0 and list(done[1].intermediate_values) == [0]  # stopped after one of 3 epochs
    assert list(done[0].intermediate_values) == [0, 1, 2]
    assert "non-finite" in done[2].user_attrs["error"] or "NaN" in done[2].user_attrs["error"], done[2].user_attrs

    # What a person reads.
    folder = out / "lr"
    table = (folder / "trials.md").read_text()
    assert table.count("| complete |") == 2 and "| pruned |" in table and "| failed |" in table
    assert all(summary["plots"][p] == "ok" for p in ("history.png", "parallel.png")), summary["plots"]
    assert all((folder / p).is_file() for p, state in summary["plots"].items() if state == "ok")
    assert summary["states"]["complete"] == 2 and summary["states"]["pruned"] == 1 and summary["states"]["failed"] == 1

    # The test set was used once, by the best trial's checkpoint; never by a trial.
    assert summary["test"]["trial"] == summary["best"]["number"] in (0, 3)
    assert not list((folder / "trials").rglob("test_report.json"))
    tested = folder / "best_test" / "report.json"
    assert tested.is_file() and "best trial" in capsys.readouterr().out

    # The best configuration is a recipe that fit.py runs as it is.
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["model"]["lr"] == GOOD and best["model"]["arch"] == "simple_cnn" and "data_dir" not in best["data"]
    from cifar_lightning.fit import fit_main

    report = fit_main(
        [
            "--config",
            str(folder / "best.yaml"),
            "--data-dir",
            str(data),
            "--output-dir",
            str(tmp_path / "rerun"),
            "--fast-dev-run",
        ]
    )
    assert report["arch"] == "simple_cnn"

    # The same command again: the study is full, nothing runs and nothing is tested again.
    stamp = tested.stat().st_mtime_ns
    sweep_main(args)
    assert len(trials(out, "lr")) == 4 and tested.stat().st_mtime_ns == stamp
    # A larger study continues it, rather than starting over.
    sweep_main([*args, "--n-trials", "4"])
    more = trials(out, "lr")
    assert [t.number for t in more] == list(range(len(more)))
    assert [(t.params, t.value, t.datetime_start) for t in more[:4]] == [
        (t.params, t.value, t.datetime_start) for t in done
    ]
    # One more place: one more trial finished (any it drew that failed took none).
    assert [t.state.name for t in more[4:]].count("FAIL") == len(more) - 5
    assert more[-1].state.name in ("COMPLETE", "PRUNED")


def test_a_study_with_other_settings_is_refused(tmp_path, capsys):
    data, out = write_image_folder(tmp_path / "data"), tmp_path / "out"
    path = write_sweep(tmp_path / "lr.yaml", n_trials=1, space={"model.lr": {"type": "categorical", "choices": [GOOD]}})
    sweep_main([str(path), "--data-dir", str(data), "--output-dir", str(out), "--no-test", "--", "--epochs", "1"])
    with pytest.raises(SystemExit) as exc:
        sweep_main([str(path), "--data-dir", str(data), "--output-dir", str(out), "--", "--epochs", "2"])
    assert exc.value.code == 2 and "started with other settings (fit_args)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Workers: Ctrl-C, a crash, two at once, DDP, PostgreSQL
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_marks_the_running_trial_failed_and_the_study_continues(tmp_path):
    data, out = write_image_folder(tmp_path / "data", n_train=40), tmp_path / "out"
    path = write_sweep(
        tmp_path / "lr.yaml",
        n_trials=2,
        fit_args=[*FIT, "--epochs", "40"],
        space={"model.lr": {"type": "categorical", "choices": [GOOD]}},
    )
    args = [str(path), "--data-dir", str(data), "--output-dir", str(out), "--no-test"]
    worker = run_worker(*args, start_new_session=True)
    started = out / "lr" / "trials" / "trial_0000" / "version_0" / "config.yaml"
    deadline = time.time() + 120
    while not started.is_file() and time.time() < deadline:  # the first trial is training
        time.sleep(0.5)
    assert started.is_file()
    time.sleep(2)
    os.killpg(worker.pid, signal.SIGINT)  # Ctrl-C at the terminal: the worker passes it on to the trial
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 130, output[-3000:]
    assert "run the same command to continue" in output and "Traceback" not in output
    (first,) = trials(out, "lr")
    assert first.state.name == "FAIL" and "signal" in first.user_attrs["error"]
    assert json.loads((out / "lr" / "trials" / "trial_0000" / "trial.json").read_text())["state"] == "interrupted"
    again = run_worker(*args, "--n-trials", "1")  # the failed trial takes no place: one more runs
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output[-3000:]
    assert [t.state.name for t in trials(out, "lr")] == ["FAIL", "COMPLETE"]


@pytest.mark.slow
def test_a_crashed_worker_leaves_a_study_that_continues(tmp_path):
    data, out = write_image_folder(tmp_path / "data", n_train=40), tmp_path / "out"
    path = write_sweep(
        tmp_path / "lr.yaml",
        n_trials=2,
        fit_args=[*FIT, "--epochs", "30"],
        space={"model.lr": {"type": "float", "low": 0.01, "high": 0.05}},
    )
    args = [str(path), "--data-dir", str(data), "--output-dir", str(out), "--no-test", "--heartbeat", "1"]
    worker = run_worker(*args, start_new_session=True)
    started = out / "lr" / "trials" / "trial_0000" / "version_0" / "config.yaml"
    deadline = time.time() + 120
    while not started.is_file() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    assert started.is_file()
    # The machine goes away: the worker and its trial's process, with no chance to record anything.
    subprocess.run(["pkill", "-9", "-f", str(out)])
    os.killpg(worker.pid, signal.SIGKILL)
    worker.communicate(timeout=60)
    (stale,) = trials(out, "lr")
    assert stale.state.name == "RUNNING"
    time.sleep(4)  # past the grace period of 3 heartbeats
    again = run_worker(*args)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output[-3000:]
    done = trials(out, "lr")
    assert done[0].state.name == "FAIL"  # its worker died: failed, not counted ...
    assert done[1].params == stale.params and done[1].state.name == "COMPLETE"  # ... and retried once
    assert sum(t.state.name == "COMPLETE" for t in done) == 2


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    data, out = write_image_folder(tmp_path / "data"), tmp_path / "out"
    path = write_sweep(
        tmp_path / "lr.yaml",
        n_trials=4,
        fit_args=[*FIT, "--epochs", "2"],
        pruner={"type": "none"},
        space={"model.lr": {"type": "float", "low": 0.005, "high": 0.05, "log": True}},
    )
    args = [str(path), "--data-dir", str(data), "--output-dir", str(out), "--no-test"]
    optuna.create_study(study_name="lr", storage=enqueue(out, "lr"), direction="maximize", load_if_exists=True)
    workers = [run_worker(*args) for _ in range(2)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[-2000:] for o in outputs]
    done = trials(out, "lr")
    # No trial lost, none run twice: four trials, each trained once, by one of the two workers.
    assert [t.state.name for t in done] == ["COMPLETE"] * 4
    assert sorted(t.number for t in done) == [0, 1, 2, 3]
    for t in done:
        assert len(list(Path(t.user_attrs["trial_dir"]).glob("version_*"))) == 1
    started = [sum(f"trial {n} starts:" in o for o in outputs) for n in range(4)]
    assert started == [1, 1, 1, 1]
    assert all(re.search(r"trial \d+ starts:", o) for o in outputs)  # each worker ran some
    assert len({t.params["model.lr"] for t in done}) == 4  # the workers' samplers drew apart


@pytest.mark.slow
def test_ddp_trials_train_the_same_parameters_and_share_pruning(tmp_path):
    data, out = write_image_folder(tmp_path / "data"), tmp_path / "out"
    path = write_sweep(tmp_path / "lr.yaml", n_trials=2)
    enqueue(out, "lr", GOOD, HOPELESS)
    worker = run_worker(
        str(path),
        "--data-dir",
        str(data),
        "--output-dir",
        str(out),
        "--no-test",
        "--",
        "--devices",
        "2",
        "--accelerator",
        "cpu",
    )
    output, _ = worker.communicate(timeout=900)
    assert worker.returncode == 0, output[-3000:]
    assert output.count("All distributed processes registered. Starting with 2 processes") == 2
    done = trials(out, "lr")
    assert [t.state.name for t in done] == ["COMPLETE", "PRUNED"]
    for t in done:
        config = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "config.yaml").read_text())
        assert str(config["trainer"]["devices"]) == "2" and config["model"]["lr"] == t.params["model.lr"]
    # Both ranks stopped at the pruning epoch (the command ended), and rank 0 alone recorded it.
    assert list(done[1].intermediate_values) == [0]
    assert json.loads((Path(done[1].user_attrs["trial_dir"]) / "trial.json").read_text())["state"] == "pruned"


def _postgres(home: Path) -> str | None:
    """A PostgreSQL server of our own in ``home``: its URL, or None where none can start."""
    import shutil
    import socket

    # On PATH, or where Debian's postgresql package puts them.
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = shutil.which("initdb") or (str(found[-1]) if found else None)
    pg_ctl = shutil.which("pg_ctl") or (str(Path(initdb).with_name("pg_ctl")) if initdb else None)
    if not (initdb and pg_ctl and Path(pg_ctl).exists()):
        return None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: its own user runs it
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            return None
        os.chown(home, user.pw_uid, user.pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = home / "data"
    steps = [
        [*_as_postgres(), initdb, "-D", str(data), "-U", "sweep", "--auth=trust"],
        [
            *_as_postgres(),
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(home / "log"),
            "-w",
            "-o",
            f"-p {port} -k {home} -c listen_addresses=127.0.0.1",
            "start",
        ],
    ]
    for step in steps:
        if subprocess.run(step, capture_output=True, timeout=120).returncode != 0:
            return None
    (home / "pg_ctl").write_text(pg_ctl)  # for the test's clean-up
    return f"postgresql://sweep@127.0.0.1:{port}/postgres"


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.mark.slow
def test_a_study_on_a_postgresql_server(tmp_path):
    import shutil
    import tempfile

    # Not under tmp_path: the server's own user must reach its folder.
    home = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    os.chmod(home, 0o755)
    url = _postgres(home)
    try:
        if url is None:
            pytest.skip("no PostgreSQL server could be started here (initdb and pg_ctl, from Debian's postgresql)")
        data, out = write_image_folder(tmp_path / "data"), tmp_path / "out"
        path = write_sweep(
            tmp_path / "lr.yaml",
            n_trials=2,
            fit_args=[*FIT, "--epochs", "2"],
            pruner={"type": "none"},
            space={"model.lr": {"type": "float", "low": 0.005, "high": 0.05}},
        )
        summary = sweep_main([str(path), "--data-dir", str(data), "--output-dir", str(out), "--storage", url])
        assert summary["storage"].startswith("postgresql://") and summary["states"]["complete"] == 2
        assert len(optuna.load_study(study_name="lr", storage=url).get_trials()) == 2  # in the server, not a file
        assert not (out / "lr" / "study.db").exists()
    finally:
        if (home / "pg_ctl").is_file():
            pg_ctl = (home / "pg_ctl").read_text()
            subprocess.run(
                [*_as_postgres(), pg_ctl, "-D", str(home / "data"), "-m", "immediate", "stop"], capture_output=True
            )
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The sweeps in configs/sweeps/
# ---------------------------------------------------------------------------------------------

SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def test_the_sweeps_exist():
    assert {"resnet20", "fastnet_muon"} <= {p.stem for p in SWEEPS}


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("sweep", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_is_valid_in_both_sizes(sweep, quick, tiny_folder):
    from cifar_lightning.sweep.runner import preflight

    spec = load_sweep(sweep, quick=quick)
    assert spec.recipe is not None and spec.recipe.is_file() and spec.n_trials >= 8
    # Every shipped sweep prunes, within the epochs its trials have.
    given = [b for a, b in zip(spec.fit_args, spec.fit_args[1:]) if a == "--epochs"]
    epochs = int(given[-1]) if given else yaml.safe_load(spec.recipe.read_text())["trainer"]["max_epochs"]
    assert spec.pruner["type"] != "none"
    assert spec.pruner.get("n_warmup_steps", 0) < epochs - 1 and spec.pruner.get("min_resource", 1) < epochs
    preflight(spec, [*spec.fit_args, "--data-dir", str(tiny_folder), "--val-size", "6"])


def test_a_recorded_sweep_keeps_its_results_with_provenance_and_no_machine_paths(tmp_path):
    from benchmarks.sweep_record import main as record_main

    data = write_image_folder(tmp_path / "data")
    path = write_sweep(
        tmp_path / "one.yaml",
        n_trials=2,
        fit_args=[*FIT, "--epochs", "2"],
        space={"model.lr": {"type": "categorical", "choices": [GOOD, 0.01]}},
    )
    kept = record_main([str(path), "--data-dir", str(data), "--output", str(tmp_path / "kept")])
    folder = tmp_path / "kept" / "one"
    assert {p.name for p in folder.iterdir()} >= {"trials.md", "trials.csv", "best.yaml", "summary.json", "history.png"}
    assert kept["provenance"]["commit"] and kept["provenance"]["command"].startswith("python")
    assert kept["test"]["trial"] == kept["best"]["number"]
    assert "Generated by `python" in (folder / "trials.md").read_text()
    for name in ("trials.md", "trials.csv", "best.yaml", "summary.json"):
        text = (folder / name).read_text()
        assert str(tmp_path) not in text and "/tmp/" not in text, name


@pytest.mark.slow
def test_a_torchrun_launch_trains_each_trial_on_every_rank(tmp_path):
    data, out = write_image_folder(tmp_path / "data"), tmp_path / "out"
    path = write_sweep(tmp_path / "lr.yaml", n_trials=2)
    enqueue(out, "lr", GOOD, HOPELESS)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "scripts" / "sweep.py"),
            str(path),
            "--data-dir",
            str(data),
            "--output-dir",
            str(out),
            "--no-test",
            "--",
            "--devices",
            "2",
            "--accelerator",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert output.count("All distributed processes registered. Starting with 2 processes") == 2
    done = trials(out, "lr")
    assert [t.state.name for t in done] == ["COMPLETE", "PRUNED"]  # one study, each trial once, on both ranks
    assert list(done[1].intermediate_values) == [0]


@pytest.mark.slow  # about 80 s: W&B offline runs of several trials
def test_trials_logged_to_wandb_are_grouped_by_study(tmp_path, monkeypatch):
    from wandb_records import read_records, wait_until_complete

    monkeypatch.setenv("WANDB_MODE", "offline")
    data, out = write_image_folder(tmp_path / "data"), tmp_path / "out"
    path = write_sweep(
        tmp_path / "lr.yaml",
        n_trials=1,
        fit_args=[*FIT, "--epochs", "1"],
        space={"model.lr": {"type": "categorical", "choices": [GOOD]}},
    )
    sweep_main([str(path), "--data-dir", str(data), "--output-dir", str(out), "--no-test", "--", "--logger=wandb"])
    (run_file,) = (out / "lr" / "trials").rglob("offline-run-*/run-*.wandb")
    wait_until_complete(run_file)
    runs = [r.run for r in read_records(run_file) if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].run_group == "lr"
