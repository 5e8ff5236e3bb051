"""One trial of a sweep, in its own process: ``python -m cifar_lightning.sweep.trial``.

The worker (``runner``) has asked the study for the trial and drawn its parameters; this process
trains them as an ordinary ``scripts/fit.py`` run (its own run directory with ``config.yaml``,
``metrics.csv`` and checkpoints), without the test, with optuna-integration's
``PyTorchLightningPruningCallback`` reporting the metric after each validation. Under DDP
(``--devices 2``) Lightning starts this same command once a rank: every rank trains the same
parameters, rank 0 reports to the study, and the pruning decision is broadcast to every rank.

The outcome is written as JSON to ``--record`` (and beside the run as ``trial.json``): state
(complete, pruned, failed, interrupted), value, run directory, epochs, seconds, error. The exit
code says it too: 0 complete, ``PRUNED_EXIT`` pruned, 128 + the signal when stopped, 1 failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna_integration import PyTorchLightningPruningCallback

from cifar_lightning.sweep.spec import PRUNED_EXIT, build_pruner
from cifar_lightning.sweep.storage import STORAGE_ENV, make_storage


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def write_record(record: dict[str, Any], path: Path) -> None:
    """``record`` as JSON at ``path`` and, once the run directory exists, as its ``trial.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=str)
    path.write_text(text)
    if record.get("run_dir") and Path(record["run_dir"]).is_dir():
        (Path(record["run_dir"]) / "trial.json").write_text(text)


def run_trial(
    storage: str,
    study_name: str,
    trial_id: int,
    monitor: str,
    pruner: dict[str, Any],
    record_path: Path,
    fit_argv: list[str],
) -> int:
    """Train one trial; returns the process's exit code."""
    from cifar_lightning.fit import fit_run

    study = optuna.load_study(study_name=study_name, storage=make_storage(storage), pruner=build_pruner(pruner))
    trial = optuna.trial.Trial(study, trial_id)
    pruning = PyTorchLightningPruningCallback(trial, monitor=monitor)
    record: dict[str, Any] = {
        "study": study_name,
        "trial": trial.number,
        "params": trial.params,
        "monitor": monitor,
        "fit_args": fit_argv,
        "state": "running",
    }
    start = time.time()
    code = 1
    try:
        result = fit_run(fit_argv, test=False, callbacks=[pruning])
        with warnings.catch_warnings():  # it reports again what rank 0 reported: "already reported"
            warnings.filterwarnings("ignore", message="The reported value is ignored")
            pruning.check_pruned()  # DDP: the decision the ranks shared (a no-op in one process)
        if result is None:
            return 0  # a rank other than 0: rank 0 writes the record
        record.update(result)
        if result["best_score"] is None:
            record.update(state="failed", error=f"no {monitor} was logged: does the run validate?")
        else:
            record.update(state="complete", value=result["best_score"])
            code = 0
    except optuna.TrialPruned as err:
        record.update(state="pruned", message=str(err), epoch=_pruned_epoch(trial))
        code = PRUNED_EXIT
    except SystemExit as err:  # a signal (Ctrl-C, SIGTERM): the fit stopped cleanly and said how
        code = err.code if isinstance(err.code, int) else 1
        record.update(state="interrupted" if code >= 128 else "failed", exit_code=code)
    except Exception as err:  # a UserError (a setting the trial cannot run with), a lost loss, a bug
        record.update(state="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
    finally:
        if _rank() == 0:
            record["seconds"] = round(time.time() - start, 2)
            record.setdefault("run_dir", _run_dir(fit_argv))
            write_record(record, record_path)
    return code


def _pruned_epoch(trial: optuna.trial.Trial) -> int | None:
    """The last epoch the trial reported before it was pruned."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return max(frozen.intermediate_values) if frozen.intermediate_values else None


def _run_dir(fit_argv: list[str]) -> str | None:
    """The run directory a fit that stopped early left (the newest version folder), if any."""
    from cifar_lightning.arguments import value_of

    out, name = value_of(fit_argv, "--output-dir"), value_of(fit_argv, "--name")
    if not (out and name):
        return None
    versions = sorted(Path(out, name).glob("version_*"), key=lambda p: p.stat().st_mtime)
    return str(versions[-1]) if versions else None


def main(argv: list[str] | None = None) -> None:
    """The trial process's command line (started by the sweep's worker, not by hand)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description="one trial of a sweep (started by scripts/sweep.py)")
    p.add_argument("--study", required=True)
    p.add_argument("--trial-id", type=int, required=True)
    p.add_argument("--monitor", required=True)
    p.add_argument("--pruner", type=json.loads, required=True, help="the sweep file's pruner entry, as JSON")
    p.add_argument("--record", type=Path, required=True)
    a = p.parse_args(argv[:split])
    raise SystemExit(
        run_trial(os.environ[STORAGE_ENV], a.study, a.trial_id, a.monitor, a.pruner, a.record, argv[split + 1 :])
    )


if __name__ == "__main__":
    main()
