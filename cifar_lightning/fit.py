"""``scripts/fit.py``: short flags over the LightningCLI, then test the best checkpoint and report.

A short flag is an alias of CLI arguments (``FIT_ALIASES``), never an implementation of its own;
the logger flags build ``--trainer.logger``. After fitting, the best checkpoint is tested once and
the report is printed and written to ``<run dir>/test_report.json``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.callbacks import Callback

from cifar_lightning.arguments import FIT_ALIASES, FIT_SWITCHES, in_fit_terms, scan_args, value_of, without_flag
from cifar_lightning.callbacks import fit_or_exit
from cifar_lightning.cli import TRAINER_DEFAULTS, CifarCLI
from cifar_lightning.errors import UserError, exit_on_user_error
from cifar_lightning.loggers import LOGGERS
from cifar_lightning.report import build_report, print_report, write_report

#: ``--resume [PATH]``: ``--ckpt_path PATH``, or ``--ckpt_path last`` (the run's latest last.ckpt).
RESUME_FLAG = "--resume"


#: Flags that together describe ``--trainer.logger`` (see ``logger_spec``).
LOGGER_FLAGS = ("--logger", "--name", "--wandb-project", "--wandb-entity", "--group", "--tags", "--watch")


LOGGER_SWITCHES = ("--log-graph",)


def next_version(folder: Path) -> int:
    """The next free ``version_<N>`` number under ``folder``."""
    taken = [int(p.name[8:]) for p in folder.glob("version_*") if p.name[8:].isdigit()]
    return max(taken, default=-1) + 1


def logger_spec(opts: dict[str, list[str]], save_dir: str, name: str) -> list[dict[str, Any]]:
    """The ``--trainer.logger`` list for fit.py's logger flags.

    The CSV logger always comes first: its folder is the run directory (checkpoints, report,
    config), and it needs no account. ``--logger tensorboard`` / ``--logger wandb`` add to it.
    """
    names = ["csv"] + [n for n in opts.get("--logger", []) if n != "csv"]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise UserError(f"unknown logger {unknown[0]!r}. Valid names: {', '.join(LOGGERS)}")
    # CSV and TensorBoard share one version folder (TensorBoard in its "tensorboard" subfolder);
    # left to themselves, each would pick its own next free version number.
    version = next_version(Path(save_dir) / name)
    specs = []
    for logger in dict.fromkeys(names):
        args: dict[str, Any] = {"save_dir": save_dir, "name": name}
        if logger == "csv":
            args.update(version=version)
        if logger == "tensorboard":
            args.update(
                version=version, sub_dir="tensorboard", default_hp_metric=False, log_graph="--log-graph" in opts
            )
        if logger == "wandb":
            args.update(
                project=opts.get("--wandb-project", ["cifar-lightning"])[-1],
                entity=opts.get("--wandb-entity", [None])[-1],
                group=opts.get("--group", [None])[-1],
                tags=[t for v in opts.get("--tags", []) for t in v.split(",") if t] or None,
                watch=opts.get("--watch", [None])[-1],
            )
        specs.append({"class_path": LOGGERS[logger], "init_args": args})
    return specs


def expand_aliases(argv: list[str]) -> list[str]:
    """Rewrite ``fit.py`` short flags into LightningCLI arguments; anything else passes through.

    The run is named after ``--name``, else the architecture, else the ``--config`` file's stem:
    ``runs/<name>/version_<N>``.
    """
    out: list[str] = []
    opts: dict[str, list[str]] = {}
    switches = {*FIT_SWITCHES, *LOGGER_SWITCHES}
    for arg in scan_args(argv, switches, optional=(RESUME_FLAG,)):
        if arg.flag == RESUME_FLAG:
            out.append(f"--ckpt_path={arg.value or 'last'}")
        elif arg.flag in switches and arg.value is None:
            out += FIT_SWITCHES.get(arg.flag, ())
            opts.setdefault(arg.flag, []).append("true")
        elif arg.flag in FIT_ALIASES or arg.flag in LOGGER_FLAGS:
            if arg.value is None:
                raise UserError(f"{arg.flag} needs a value, e.g. {arg.flag} {_ALIAS_EXAMPLES.get(arg.flag, 'VALUE')}")
            out += [
                target.replace("{value}", arg.value) if "{value}" in target else f"{target}={arg.value}"
                for target in FIT_ALIASES.get(arg.flag, ())
            ]
            opts.setdefault(arg.flag, []).append(arg.value)
        else:
            out += arg.tokens
    config = value_of(out, "--config")
    name = (
        (opts.get("--name") or [None])[-1] or value_of(out, "--model.arch") or (Path(config).stem if config else None)
    )
    save_dir = (opts.get("--output-dir") or [None])[-1]
    if any(f in opts for f in LOGGER_FLAGS + LOGGER_SWITCHES if f != "--name"):
        specs = logger_spec(opts, save_dir or TRAINER_DEFAULTS["default_root_dir"], name or "cifar10")
        out.append(f"--trainer.logger={json.dumps(specs)}")
    else:
        # Only the default CSV logger: adjust its folder and name, keep the rest of any config.
        out += [f"--trainer.logger.init_args.save_dir={save_dir}"] if save_dir else []
        out += [f"--trainer.logger.init_args.name={name}"] if name else []
    return out


_ALIAS_EXAMPLES = {
    "--arch": "resnet18",
    "--epochs": "30",
    "--batch-size": "128",
    "--lr": "0.1",
    "--logger": "tensorboard",
    "--watch": "gradients",
    "--ema": "0.999",
    "--swa": "0.01",
}


def fit_help() -> str:
    """The alias table shown by ``scripts/fit.py --help`` above the full CLI help."""
    rows = [f"  {a:<18} {' + '.join(t)}" for a, t in {**FIT_ALIASES, **FIT_SWITCHES}.items()]
    return (
        "usage: scripts/fit.py [short flags] [--config FILE.yaml] [any 'fit' argument of the CLI]\n\n"
        "Fits, tests the best checkpoint, prints the test report and writes it to\n"
        "<run dir>/test_report.json. Short flags are aliases of the CLI arguments:\n"
        + "\n".join(rows)
        + "\n\nLogging (build --trainer.logger; the CSV log is always kept as the run directory):\n"
        "  --logger NAME      add tensorboard or wandb (repeatable)\n"
        "  --name NAME        run name: runs/<name>/version_N (default: the arch or the config's name)\n"
        "  --wandb-project P, --wandb-entity E, --group G, --tags a,b\n"
        "  --watch MODE       W&B gradient/parameter histograms: gradients, parameters or all\n"
        "  --log-graph        TensorBoard model graph\n"
        "\nResuming:\n"
        "  --resume [PATH]    continue from last.ckpt: of the latest run of this name, or of the run\n"
        "                     directory / checkpoint file PATH (same flags as the first run)\n"
        "\nAll arguments of `python -m cifar_lightning fit` follow.\n"
    )


@exit_on_user_error
def fit_main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """``scripts/fit.py``: fit, test the best checkpoint, print and save the report (rank 0)."""
    return fit_run(argv)


def fit_run(
    argv: list[str] | None = None, *, test: bool = True, callbacks: Sequence[Callback] = ()
) -> dict[str, Any] | None:
    """What ``fit_main`` does, without the exit on a user error: fit with ``fit.py``'s arguments
    ``argv`` and ``callbacks`` added to the CLI's, then, with ``test``, test and report.

    Without ``test`` (a sweep's trial, which must not see the test set) the returned dict holds the
    fit alone: run directory, best and last checkpoints, the monitored metric's best value,
    epochs, steps and seconds. Returns None on the ranks other than 0 of a DDP run.
    """
    try:
        return _fit_test_report(argv, test, callbacks)
    except UserError as err:
        raise type(err)(in_fit_terms(str(err))) from None  # the same kind, so the same exit code


def _fit_test_report(argv: list[str] | None, test: bool, callbacks: Sequence[Callback]) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(fit_help())
        argv = ["--help"]
    args = expand_aliases(argv)

    # The arguments are sys.argv rewritten, so Lightning's "args and sys.argv both given" note does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = CifarCLI(args=args, run=False, command="python scripts/fit.py")
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    trainer.callbacks.extend(callbacks)
    ckpt_path = cli.config.get("ckpt_path")

    def resume_command(ckpt: str) -> str:
        location = Path(ckpt).parent.parent if Path(ckpt).parent.name == "checkpoints" else Path(ckpt)
        args = [*without_flag(argv, RESUME_FLAG, FIT_SWITCHES), RESUME_FLAG, str(location)]
        return shlex.join(["python", "scripts/fit.py", *args])

    start = time.perf_counter()
    fit_or_exit(trainer, lambda: trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path), resume_command)
    fit_seconds = time.perf_counter() - start

    ckpt_cb = trainer.checkpoint_callback
    # Read before testing: loading a checkpoint for the test restores the callback's older state.
    best = ckpt_cb.best_model_path if ckpt_cb else ""
    last = (ckpt_cb.last_model_path if ckpt_cb else "") or None
    # A run whose result is its final weights (SWA's average) tests those, not the best epoch's.
    tested = (last or best) if any(getattr(cb, "tests_final_weights", False) for cb in trainer.callbacks) else best
    if not test:
        run_dir = trainer.log_dir or trainer.default_root_dir  # a collective call under DDP: every rank
        score = ckpt_cb.best_model_score if ckpt_cb else None
        return (
            {
                "run_dir": run_dir,
                "checkpoint": tested or None,
                "last_checkpoint": last,
                "monitor": ckpt_cb.monitor if ckpt_cb else None,
                "best_score": None if score is None else float(score),
                "fit_seconds": round(fit_seconds, 2),
                "epochs": trainer.current_epoch,
                "global_step": trainer.global_step,
            }
            if trainer.is_global_zero
            else None
        )
    start = time.perf_counter()
    trainer.test(model, datamodule=datamodule, ckpt_path=tested or None, verbose=False)
    test_seconds = time.perf_counter() - start
    run_dir = trainer.log_dir or trainer.default_root_dir  # a collective call under DDP: every rank
    if not trainer.is_global_zero:
        return None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    names = datamodule.class_names
    report = build_report(
        arch=model.hparams.arch,
        class_names=names,
        test_acc=metrics["test/acc"],
        test_loss=metrics["test/loss"],
        per_class_acc={n: metrics[f"test/acc/{n}"] for n in names if f"test/acc/{n}" in metrics},
        # Logged where they apply: top-5 beyond 10 classes, superclass accuracy for grouped classes.
        **{f"test_{k}": metrics[f"test/{k}"] for k in ("acc_top5", "acc_superclass") if f"test/{k}" in metrics},
        test_images=len(datamodule.test_set),
        checkpoint=tested or None,
        last_checkpoint=last,
        fit_seconds=round(fit_seconds, 2),
        test_seconds=round(test_seconds, 2),
        epochs=trainer.current_epoch,
        global_step=trainer.global_step,
        seed=cli.config.get("seed_everything"),
        devices=trainer.world_size,
        precision=str(trainer.precision),
        precision_reason=getattr(trainer, "precision_reason", "as asked"),
        data_dir=str(datamodule.source.root),
        train_images=len(datamodule.train_set),
        val_images=len(datamodule.val_set) if datamodule.val_set is not None else 0,
        # Fewer than the split when the run limits its batches (limit_*_batches, fast_dev_run).
        # The images the last training epoch took (fewer than the split with limit_train_batches).
        train_images_seen=model.images_seen.get("train", 0),
        val_images_seen=model.images_seen.get("val", 0),
        test_images_seen=model.images_seen.get("test", 0),
    )
    report["report_path"] = f"{run_dir}/test_report.json"
    write_report(report, report["report_path"])
    print_report(report)
    print(f"report: {report['report_path']}")
    finish_wandb_runs(trainer)
    return report


def finish_wandb_runs(trainer) -> None:
    """Close W&B runs now rather than at interpreter exit, so callers in the same process can read them."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


if __name__ == "__main__":
    fit_main()
