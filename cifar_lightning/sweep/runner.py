"""``scripts/sweep.py``: a worker of an Optuna study over a sweep file.

``python scripts/sweep.py SWEEP.yaml [--n-trials N] [--timeout S] [--storage URL] [--study NAME]
[--data-dir DIR] [--output-dir DIR] [--quick] [-- FIT ARGS...]``

A worker asks the study for a trial, trains it in its own process (``trial``: an ordinary
``scripts/fit.py`` run, validated every epoch, pruned by the study's pruner, never tested) and
tells the study how it ended, until the study holds ``n_trials`` trials finished or running, all
workers counted, or ``--timeout`` seconds have passed. Several workers share one study when they
are given the same ``--storage``: the same command started N times on one machine (SQLite, the
default, in the output folder), or on N machines (a PostgreSQL URL, or ``journal:PATH`` on a
shared file system). Run the command again after a crash and the study continues where it
stopped: the trials it holds are kept, and a trial whose worker died is failed and retried once.

When no trial is left running, the worker writes what a person reads (``results``): the table of
trials, the best configuration as a recipe, the plots; and tests the best trial's checkpoint on
the test set, once for the study (``--no-test``: never).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cifar_lightning.errors import UserError, exit_on_user_error
from cifar_lightning.sweep.results import test_best, write_results
from cifar_lightning.sweep.spec import PRUNED_EXIT, SweepSpec, extremes, load_sweep, param_args, suggest
from cifar_lightning.sweep.storage import STORAGE_ENV, make_storage

#: States a study's size counts: a failed trial does not use up a place, a running one does.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class TrialFailed(Exception):
    """A trial that ended with an error: recorded as failed, and the study goes on."""


def stop_when_failing(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Stop the study once as many trials failed as it has places: the rest would fail too."""
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    size = study.user_attrs.get("n_trials", 0)
    if size and len(failed) >= size:
        print(f"stopping: {len(failed)} trials failed (see trials.md for their errors)", file=sys.stderr, flush=True)
        study.stop()


def preflight(spec: SweepSpec, fit_args: list[str]) -> None:
    """Build (not run) a trial at every bound and choice of the space, so that a wrong key, type or
    value stops the sweep before its first trial, with the CLI's own message."""
    import contextlib
    import io

    from cifar_lightning.cli import CifarCLI
    from cifar_lightning.fit import expand_aliases, in_fit_terms

    with tempfile.TemporaryDirectory() as out:
        for params in extremes(spec.space):
            argv = [*spec.recipe_args(), *fit_args, *param_args(params), "--output-dir", out]
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    cli = CifarCLI(args=expand_aliases(argv), run=False)
            except SystemExit:
                lines = [line for line in err.getvalue().splitlines() if line.strip()]
                raise UserError(
                    f"{spec.path}: a trial with {params} does not parse: "
                    f"{in_fit_terms(lines[-1] if lines else 'see above')}"
                ) from None
            except UserError as e:
                raise UserError(f"{spec.path}: a trial with {params} is refused: {in_fit_terms(str(e))}") from None
            except Exception as e:  # a network that cannot be built with these values, ...
                raise UserError(
                    f"{spec.path}: a trial with {params} cannot be built: {type(e).__name__}: {e}"
                ) from None
            if cli.datamodule.hparams.val_size == 0:
                raise UserError(
                    f"{spec.path}: a study chooses on the validation split, and its trials have none "
                    "(--val-size 0): give them one, e.g. --val-size 5000"
                )


class Followers:
    """Under ``torchrun --nproc_per_node N scripts/sweep.py ...``: the worker on rank 0 runs the
    study and hands each trial's command to the other ranks, whose processes train it beside its
    own (each trial process inherits its rank from torchrun, and Lightning joins them in one DDP
    run). The hand-off is a key-value store (``TCPStore``) on the port after torchrun's, which the
    trials use; no process group, so nothing a trial's own DDP does can cross it."""

    def __init__(self) -> None:
        import datetime

        from torch.distributed import TCPStore

        self.rank, self.sent = int(os.environ["RANK"]), 0
        # A trial can take hours while the other ranks wait for the next command.
        self.store = TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]) + 1,
            int(os.environ["WORLD_SIZE"]),
            is_master=self.rank == 0,
            timeout=datetime.timedelta(days=7),
        )

    @staticmethod
    def launched() -> bool:
        """Whether torchrun started this worker as one of several processes."""
        return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1

    def trial_env(self) -> dict[str, str]:
        """Rank 0: the environment of the next trial's processes on every rank. Each trial's DDP
        meets on a port of its own: torchrun's store keeps the addresses of the last trial's
        ranks, which the next one would read and call."""
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return {"MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "False"}

    def send(self, command: dict[str, Any] | None) -> None:
        """Rank 0: the next trial's command and environment for every rank (None: the study is done)."""
        self.store.set(f"command/{self.sent}", json.dumps(command))
        self.sent += 1

    def follow(self) -> None:
        """The other ranks: run each command rank 0 sends, until it sends None."""
        for i in itertools.count():
            command = json.loads(self.store.get(f"command/{i}"))
            if command is None:
                break
            subprocess.run(command["argv"], env={**os.environ, **command["env"]})
        self.store.set(f"done/{self.rank}", "1")

    def close(self) -> None:
        """Rank 0: tell the others the study is done, and keep the store up until they have read it."""
        self.send(None)
        self.store.wait([f"done/{r}" for r in range(1, int(os.environ["WORLD_SIZE"]))])


class Worker:
    """One worker's loop over a study: ask, train in a child process, tell."""

    def __init__(
        self,
        spec: SweepSpec,
        study: optuna.Study,
        storage_url: str,
        out: Path,
        fit_args: list[str],
        followers: Followers | None = None,
    ) -> None:
        self.spec, self.study, self.storage_url, self.out, self.fit_args = spec, study, storage_url, out, fit_args
        self.followers = followers
        self.interrupted = False

    def objective(self, trial: optuna.Trial) -> float:
        params = {key: suggest(trial, key, dist) for key, dist in self.spec.space.items()}
        name = f"trial_{trial.number:04d}"
        record_path = self.out / "trials" / name / "trial.json"
        trial.set_user_attr("trial_dir", str(record_path.parent))
        mode = "max" if self.spec.direction == "maximize" else "min"
        fit_argv = [
            *self.spec.recipe_args(),
            *self.fit_args,
            *param_args(params),
            "--output-dir",
            str(self.out / "trials"),
            "--name",
            name,
            f"--checkpoint.monitor={self.spec.metric}",
            f"--checkpoint.mode={mode}",
        ]
        wandb = any(a == "wandb" or a.endswith("=wandb") for a in self.fit_args)
        if wandb and not any(a.split("=")[0] == "--group" for a in self.fit_args):
            fit_argv += ["--group", self.study.study_name]  # W&B: the trials grouped by study
        command = [
            sys.executable,
            "-m",
            "cifar_lightning.sweep.trial",  # the storage URL: in STORAGE_ENV
            "--study",
            self.study.study_name,
            "--trial-id",
            str(trial._trial_id),
            "--monitor",
            self.spec.metric,
            "--pruner",
            json.dumps(self.spec.pruner),
            "--record",
            str(record_path),
            "--",
            *fit_argv,
        ]
        print(f"trial {trial.number} starts: {params}", flush=True)
        code = self._run(command)
        record = _read(record_path)
        for key in ("run_dir", "seconds", "epochs", "checkpoint"):
            if record.get(key) is not None:
                trial.set_user_attr(key, record[key])
        if record.get("state") == "interrupted" or (self.interrupted and record.get("state") != "complete"):
            trial.set_user_attr("error", "stopped by a signal (Ctrl-C or SIGTERM)")
            print(f"trial {trial.number}: stopped by a signal", flush=True)
            raise KeyboardInterrupt
        if self.interrupted:  # the signal came as the trial ended: keep its result, then stop
            self.study.stop()
        if code == PRUNED_EXIT and record.get("state") == "pruned":
            print(f"trial {trial.number}: pruned after epoch {record.get('epoch')}", flush=True)
            raise optuna.TrialPruned(record.get("message", "pruned"))
        if code == 0 and record.get("state") == "complete":
            print(f"trial {trial.number}: {self.spec.metric} {record['value']:.4f}", flush=True)
            return float(record["value"])
        error = record.get("error") or f"the trial's process exited with code {code} and left no record"
        trial.set_user_attr("error", error)
        print(f"trial {trial.number} failed: {error}", flush=True)
        raise TrialFailed(error)

    def _run(self, command: list[str]) -> int:
        """Run the trial's process to its end. Ctrl-C and SIGTERM are passed on to it (it stops
        cleanly and records it); this worker waits for it, then stops."""

        def note(signum, frame):
            # Passed on once: the trial stops after its batch and records it (a second Ctrl-C
            # would stop it at once, without its last.ckpt).
            if not self.interrupted and proc.poll() is None:
                proc.send_signal(signum)
            self.interrupted = True

        env = {**os.environ, STORAGE_ENV: self.storage_url}
        if self.followers is not None:
            extra = self.followers.trial_env()
            self.followers.send({"argv": command, "env": {**extra, STORAGE_ENV: self.storage_url}})
            env.update(extra)
        # Its own session: a Ctrl-C at the terminal reaches this worker only, which passes it on.
        proc = subprocess.Popen(command, env=env, start_new_session=True)
        previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def remaining(self) -> int:
        """Places left in the study: its size less the trials finished or running."""
        return self.spec.n_trials - len(self.study.get_trials(deepcopy=False, states=COUNTED))


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def worker_seed() -> int:
    """What this worker adds to the sampler's seed: its process id, so that workers started
    together do not draw the same values (a study is reproducible only with one worker)."""
    return os.getpid()


def without_paths(fit_args: list[str]) -> list[str]:
    """``fit_args`` without where this machine keeps the data: workers on other machines give
    other paths for the same study."""
    from cifar_lightning.arguments import without_flag

    return without_flag(without_flag(fit_args, "--data-dir"), "--data.data_dir")


def open_study(spec: SweepSpec, name: str, storage: optuna.storages.BaseStorage, fit_args: list[str]) -> optuna.Study:
    """Create the study, or load it when it exists; a study made with other settings is refused."""
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=spec.make_sampler(worker_seed()),
        pruner=spec.make_pruner(),
        direction=spec.direction,
        load_if_exists=True,
    )
    settings = {
        "sweep_file": spec.path.name,
        "metric": spec.metric,
        "space": {k: repr(v) for k, v in spec.space.items()},
        "fit_args": without_paths(fit_args),
        "recipe": spec.recipe.name if spec.recipe else None,
    }
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", settings)
    elif stored != settings:
        changed = sorted(k for k in settings if stored.get(k) != settings[k])
        raise UserError(
            f"study {name!r} in this storage was started with other settings ({', '.join(changed)}): "
            "run it as it was, or start another with --study NEW_NAME"
        )
    return study


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/sweep.py",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- are scripts/fit.py arguments for every trial.",
    )
    p.add_argument("sweep", help="the sweep file (YAML), e.g. configs/sweeps/resnet20.yaml")
    p.add_argument("--n-trials", type=int, help="the study's size: trials finished or running (default: the file's)")
    p.add_argument("--timeout", type=float, help="this worker starts no trial after this many seconds")
    p.add_argument("--storage", help="an SQLAlchemy URL or journal:PATH (default: sqlite:///OUT/STUDY/study.db)")
    p.add_argument("--study", help="the study's name (default: the sweep file's name, -quick with --quick)")
    p.add_argument("--data-dir", help="the images (every trial's --data-dir)")
    p.add_argument("--output-dir", default="runs/sweeps", help="where studies keep their trials (default runs/sweeps)")
    p.add_argument("--quick", action="store_true", help="the file's quick size: fewer, shorter trials")
    p.add_argument("--heartbeat", type=int, default=60, help="seconds between a running trial's heartbeats")
    p.add_argument("--no-test", action="store_true", help="never test the best trial (leave it to a later run)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run this worker's share of the study, then write its results; returns the summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser().parse_args(argv[:split]), argv[split + 1 :]
    followers = Followers() if Followers.launched() else None
    if followers is not None and followers.rank != 0:
        followers.follow()
        return {}
    try:
        return _run_study(args, extra, followers)
    finally:
        if followers is not None:
            followers.close()


def _run_study(args: argparse.Namespace, extra: list[str], followers: Followers | None) -> dict[str, Any]:
    spec = load_sweep(args.sweep, quick=args.quick)
    if args.n_trials is not None:
        if args.n_trials < 0:
            raise UserError(f"--n-trials must be 0 or more, got {args.n_trials}")
        spec = SweepSpec(**{**spec.__dict__, "n_trials": args.n_trials})
    name = args.study or spec.path.stem + ("-quick" if args.quick else "")
    out = Path(args.output_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    storage_url = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    fit_args = [*spec.fit_args, *(["--data-dir", args.data_dir] if args.data_dir else []), *extra]
    preflight(spec, fit_args)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's end is printed below, in one line
    study = open_study(spec, name, make_storage(storage_url, args.heartbeat), fit_args)
    study.set_user_attr("n_trials", max(spec.n_trials, 1))
    worker = Worker(spec, study, storage_url, out, fit_args, followers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a trial whose worker died: failed (and retried) before counting
    stopped = None
    if worker.remaining() > 0:
        try:
            study.optimize(
                worker.objective,
                timeout=args.timeout,
                catch=(TrialFailed,),
                callbacks=[optuna.study.MaxTrialsCallback(spec.n_trials, states=COUNTED), stop_when_failing],
            )
        except KeyboardInterrupt:
            stopped = "interrupted: the running trial is marked failed; run the same command to continue the study"
    summary = write_results(study, spec, out, storage_url)
    if stopped:
        print(stopped, file=sys.stderr)
        raise SystemExit(130)
    busy = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    if not args.no_test and not busy and worker.remaining() <= 0:
        summary = test_best(study, out) or summary
    return summary


if __name__ == "__main__":
    main()
