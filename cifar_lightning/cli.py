"""Command line: one LightningCLI over ``ClassifierModule`` and ``CIFAR10DataModule``.

``python -m cifar_lightning fit|validate|test|predict --config recipe.yaml`` is the full CLI;
``scripts/fit.py`` maps its short flags onto the same arguments (see ``FIT_ALIASES``) and adds
the test-and-report step after fitting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cifar_lightning.callbacks import CHECKPOINT_DEFAULTS, default_callbacks
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.errors import UserError, exit_on_user_error
from cifar_lightning.module import ClassifierModule
from cifar_lightning.tracking import ConfigSavingCallback, TestResultsLogger

#: Trainer settings that differ from Lightning's defaults.
TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs",
    "max_epochs": 30,
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "runs", "name": "cifar10"},
    },
    # Metrics are epoch-level; a larger interval keeps the step-level LR/loss logging cheap.
    "log_every_n_steps": 50,
}


class CifarCLI(LightningCLI):
    """LightningCLI with the project's default callbacks, links and argument checks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_callback", ConfigSavingCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(ClassifierModule, CIFAR10DataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()})
        parser.add_lightning_class_args(TestResultsLogger, "test_results")
        # What the data determines is passed to the model when both exist, and so ends up in
        # the checkpoint; these model arguments are therefore not set by hand.
        for source, target in (
            ("data.num_classes", "model.num_classes"),
            ("data.class_names", "model.class_names"),
            ("data.norm_mean", "model.norm_mean"),
            ("data.norm_std", "model.norm_std"),
        ):
            parser.link_arguments(source, target, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        epochs = cfg.trainer.max_epochs
        if epochs is not None and epochs <= 0:
            raise UserError(f"the number of epochs must be positive, got {epochs}. Pass e.g. --epochs 30.")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except MisconfigurationException as err:
            # Lightning's own checks (devices that do not exist, bad accelerator...) are user errors.
            raise UserError(str(err)) from None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]):
        return super()._instantiate_trainer(config, callbacks + default_callbacks(config))


@exit_on_user_error
def cli_main(args: list[str] | None = None, **kwargs: Any) -> CifarCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``); returns it for ``run=False`` callers."""
    return CifarCLI(args=args, **kwargs)


# ---------------------------------------------------------------------------------------------
# scripts/fit.py: short flags over the same CLI, then test the best checkpoint and report
# ---------------------------------------------------------------------------------------------

#: Short flag -> the CLI argument(s) it stands for. A flag never has its own implementation.
FIT_ALIASES: dict[str, tuple[str, ...]] = {
    "--arch": ("--model.arch",),
    "--epochs": ("--trainer.max_epochs",),
    "--batch-size": ("--data.batch_size",),
    "--lr": ("--model.lr",),
    "--optimizer": ("--model.optimizer",),
    "--scheduler": ("--model.scheduler",),
    "--weight-decay": ("--model.weight_decay",),
    "--label-smoothing": ("--model.label_smoothing",),
    "--augment": ("--data.augment",),
    "--data-dir": ("--data.data_dir",),
    "--val-size": ("--data.val_size",),
    "--num-workers": ("--data.num_workers",),
    "--devices": ("--trainer.devices",),
    "--accelerator": ("--trainer.accelerator",),
    "--precision": ("--trainer.precision",),
    "--seed": ("--seed_everything",),
    "--output-dir": ("--trainer.default_root_dir",),
}
#: Flags that take no value.
FIT_SWITCHES: dict[str, tuple[str, ...]] = {
    "--download": ("--data.download=true",),
    "--no-download": ("--data.download=false",),
    "--fast-dev-run": ("--trainer.fast_dev_run=true",),
}
#: Flags that together describe ``--trainer.logger`` (see ``logger_spec``).
LOGGER_FLAGS = ("--logger", "--name", "--wandb-project", "--wandb-entity", "--group", "--tags", "--watch")
LOGGER_SWITCHES = ("--log-graph",)
LOGGERS = {
    "csv": "lightning.pytorch.loggers.CSVLogger",
    "tensorboard": "cifar_lightning.tracking.TensorBoardLogger",
    "wandb": "cifar_lightning.tracking.WandbLogger",
}


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
            args.update(version=version, sub_dir="tensorboard", default_hp_metric=False, log_graph="--log-graph" in opts)
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
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, value = token.partition("=")
        if (flag in FIT_SWITCHES or flag in LOGGER_SWITCHES) and not eq:
            out += FIT_SWITCHES.get(flag, ())
            opts.setdefault(flag, []).append("true")
        elif flag in FIT_ALIASES or flag in LOGGER_FLAGS:
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise UserError(f"{flag} needs a value, e.g. {flag} {_ALIAS_EXAMPLES.get(flag, 'VALUE')}")
                i += 1
                value = argv[i]
            out += [f"{target}={value}" for target in FIT_ALIASES.get(flag, ())]
            opts.setdefault(flag, []).append(value)
        else:
            out.append(token)
        i += 1
    config = _value_of(out, "--config")
    name = (opts.get("--name") or [None])[-1] or _value_of(out, "--model.arch") or (Path(config).stem if config else None)
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
    "--arch": "resnet18", "--epochs": "30", "--batch-size": "128", "--lr": "0.1",
    "--logger": "tensorboard", "--watch": "gradients",
}  # fmt: skip


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
        "\nAll arguments of `python -m cifar_lightning fit` follow.\n"
    )


@exit_on_user_error
def fit_main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """``scripts/fit.py``: fit, test the best checkpoint, print and save the report (rank 0)."""
    import sys
    import time
    import warnings

    from cifar_lightning.report import build_report, print_report, write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(fit_help())
        argv = ["--help"]
    args = expand_aliases(argv)

    # The arguments are sys.argv rewritten, so Lightning's "args and sys.argv both given" note does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = CifarCLI(args=args, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start

    ckpt_cb = trainer.checkpoint_callback
    # Read before testing: loading a checkpoint for the test restores the callback's older state.
    best = ckpt_cb.best_model_path if ckpt_cb else ""
    last = (ckpt_cb.last_model_path if ckpt_cb else "") or None
    start = time.perf_counter()
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    test_seconds = time.perf_counter() - start
    run_dir = trainer.log_dir or trainer.default_root_dir  # a collective call under DDP: every rank
    if not trainer.is_global_zero:
        return None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    report = build_report(
        metrics,
        datamodule.class_names,
        arch=model.hparams.arch,
        checkpoint=best or None,
        fit_seconds=fit_seconds,
        test_seconds=test_seconds,
        extra={
            "last_checkpoint": last,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "seed": cli.config.get("seed_everything"),
            "devices": trainer.world_size,
            "data_dir": str(datamodule.source.root),
            "train_images": len(datamodule.train_set),
            "val_images": len(datamodule.val_set),
            "test_images": len(datamodule.test_set),
        },
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


def _value_of(args: list[str], key: str) -> str | None:
    value = None
    for i, a in enumerate(args):
        flag, eq, v = a.partition("=")
        if flag == key:
            value = v if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value
