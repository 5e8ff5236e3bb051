"""Command line: one LightningCLI over ``ClassifierModule`` and ``CIFAR10DataModule``.

``python -m cifar_lightning fit|validate|test|predict --config recipe.yaml`` is the full CLI;
``scripts/fit.py`` maps its short flags onto the same arguments (see ``FIT_ALIASES``) and adds
the test-and-report step after fitting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cifar_lightning.callbacks import CHECKPOINT_DEFAULTS, default_callbacks
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.errors import UserError, exit_on_user_error
from cifar_lightning.module import ClassifierModule

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
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(ClassifierModule, CIFAR10DataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()})
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
    "--output-dir": ("--trainer.default_root_dir", "--trainer.logger.init_args.save_dir"),
    "--name": ("--trainer.logger.init_args.name",),
}
#: Flags that take no value.
FIT_SWITCHES: dict[str, tuple[str, ...]] = {
    "--download": ("--data.download=true",),
    "--no-download": ("--data.download=false",),
    "--fast-dev-run": ("--trainer.fast_dev_run=true",),
}


def expand_aliases(argv: list[str]) -> list[str]:
    """Rewrite ``fit.py`` short flags into LightningCLI arguments; anything else passes through."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, value = token.partition("=")
        if flag in FIT_SWITCHES and not eq:
            out += FIT_SWITCHES[flag]
        elif flag in FIT_ALIASES:
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{flag} needs a value, e.g. {flag} {_ALIAS_EXAMPLES.get(flag, 'VALUE')}")
                i += 1
                value = argv[i]
            out += [f"{target}={value}" for target in FIT_ALIASES[flag]]
        else:
            out.append(token)
        i += 1
    return out


_ALIAS_EXAMPLES = {"--arch": "resnet18", "--epochs": "30", "--batch-size": "128", "--lr": "0.1"}


def fit_help() -> str:
    """The alias table shown by ``scripts/fit.py --help`` above the full CLI help."""
    rows = [f"  {a:<18} {' + '.join(t)}" for a, t in {**FIT_ALIASES, **FIT_SWITCHES}.items()]
    return (
        "usage: scripts/fit.py [short flags] [--config FILE.yaml] [any 'fit' argument of the CLI]\n\n"
        "Fits, tests the best checkpoint, prints the test report and writes it to\n"
        "<run dir>/test_report.json. Short flags are aliases of the CLI arguments:\n"
        + "\n".join(rows)
        + "\n\nAll arguments of `python -m cifar_lightning fit` follow.\n"
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
    names_run = any(a.partition("=")[0] in ("--name", "--trainer.logger.init_args.name") for a in argv)
    args = expand_aliases(argv)
    # runs/<arch>/version_N, or runs/<recipe>/version_N for `--config configs/<recipe>.yaml`
    config = _value_of(args, "--config")
    run_name = _value_of(args, "--model.arch") or (Path(config).stem if config else None)
    if run_name and not names_run:
        args.append(f"--trainer.logger.init_args.name={run_name}")

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
    return report


def _value_of(args: list[str], key: str) -> str | None:
    value = None
    for i, a in enumerate(args):
        flag, eq, v = a.partition("=")
        if flag == key:
            value = v if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value
