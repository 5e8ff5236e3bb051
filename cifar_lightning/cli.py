"""Command line: one LightningCLI over ``ClassifierModule`` and ``CIFAR10DataModule``.

``python -m cifar_lightning fit|validate|test|predict --config recipe.yaml`` is the full CLI;
``scripts/fit.py`` maps its short flags onto the same arguments (see ``FIT_ALIASES``) and adds
the test-and-report step after fitting.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from cifar_lightning.callbacks import CHECKPOINT_DEFAULTS, default_callbacks
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.errors import UserError, exit_on_user_error
from cifar_lightning.module import ClassifierModule
from cifar_lightning.resilience import (
    LIGHTNING_CKPT_NAMES,
    check_checkpoint_file,
    check_resumable,
    check_writable_dir,
    find_resume_checkpoint,
    fit_or_exit,
    run_location,
    with_atomic_checkpoint_io,
)
from cifar_lightning.tracking import ConfigSavingCallback, TestResultsLogger

#: Trainer settings that differ from Lightning's defaults.
TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs",
    "max_epochs": 30,
    "logger": {
        # Lightning's CSVLogger, except that a resumed run continues its metrics.csv.
        "class_path": "cifar_lightning.resilience.ResumableCSVLogger",
        "init_args": {"save_dir": "runs", "name": "cifar10"},
    },
    # Metrics are epoch-level; a larger interval keeps the step-level LR/loss logging cheap.
    "log_every_n_steps": 50,
}


#: Lightning's advertisement for its hosted logger, printed by every Trainer without one.
_LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"


def _not_litlogger_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_LITLOGGER_TIP)


def quiet_lightning_notes() -> None:
    """Filter out two things Lightning prints on every run that say nothing about the run.

    Each filter matches one exact message: the litlogger tip, and torch 2.14's deprecation of
    ``LeafSpec``, which Lightning 2.6's own batch flattening triggers (not our call to change).
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if _not_litlogger_tip not in log.filters:
            log.addFilter(_not_litlogger_tip)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


class CifarCLI(LightningCLI):
    """LightningCLI with the project's default callbacks, links and argument checks.

    A fit's ``ckpt_path`` (``--resume`` of fit.py) is resolved before anything is built: ``last``
    or a run directory becomes that run's ``last.ckpt``, the file is checked, and the resumed run
    logs into the run directory the checkpoint came from. Checkpoints are written atomically
    (``AtomicCheckpointIO``), and a fit stopped by Ctrl-C or SIGTERM says how to resume it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_callback", ConfigSavingCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        given = kwargs.get("args")
        self.argv: list[str] = list(given) if isinstance(given, (list, tuple)) else sys.argv[1:]
        #: (path, hyperparameters) of the checkpoint a fit resumes from.
        self.resume_from: tuple[str, dict[str, Any]] | None = None
        quiet_lightning_notes()
        super().__init__(ClassifierModule, CIFAR10DataModule, *args, **kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:
            # scripts/fit.py builds without subcommands and calls fit itself; --resume sets this.
            self.parser.add_argument(
                "--ckpt_path", type=Optional[str], default=None,
                help="Resume from this checkpoint: a .ckpt file, a run directory, or 'last'.",
            )  # fmt: skip

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

    def _subconfig(self):
        return self.config[self.config.subcommand] if self.config.get("subcommand") else self.config

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Before Lightning reads the checkpoint's hyperparameters, so that a bad file gets one
        # clear error instead of an unpickling traceback.
        cfg = self._subconfig()
        ckpt = cfg.get("ckpt_path")
        if not ckpt or ckpt in LIGHTNING_CKPT_NAMES or str(ckpt).startswith("registry"):
            return
        if self.config.get("subcommand", "fit") != "fit":
            if ckpt != "last":  # validate/test/predict: Lightning's own meaning of 'last'
                check_checkpoint_file(ckpt)
            return
        path = find_resume_checkpoint(ckpt, *_run_root(cfg))
        checkpoint = check_checkpoint_file(path)
        self.resume_from = (str(path), checkpoint["hyper_parameters"])
        cfg.ckpt_path = str(path)
        location = run_location(path, _stored_checkpoint_dir(checkpoint))
        if location is not None:
            _log_into(cfg, *location)

    def before_instantiate_classes(self) -> None:
        cfg = self._subconfig()
        epochs = cfg.trainer.max_epochs
        if epochs is not None and epochs <= 0:
            raise UserError(f"the number of epochs must be positive, got {epochs}. Pass e.g. --epochs 30.")
        _check_devices(cfg.trainer.accelerator, cfg.trainer.devices)
        _apply_no_validation(cfg)
        # Fail now rather than after the data is loaded, or at the first checkpoint.
        if cfg.trainer.default_root_dir:
            check_writable_dir(cfg.trainer.default_root_dir)
        for save_dir, _ in _logger_dirs(cfg):
            check_writable_dir(save_dir, "log folder")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except MisconfigurationException as err:
            # Lightning's own checks (devices that do not exist, bad accelerator...) are user errors.
            raise UserError(str(err)) from None

    def after_instantiate_classes(self) -> None:
        if self.resume_from is not None:
            path, stored = self.resume_from
            check_resumable(stored, path, self.model.hparams)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]):
        config = {**config, "plugins": with_atomic_checkpoint_io(config.get("plugins"))}
        return super()._instantiate_trainer(config, callbacks + default_callbacks(config))

    def fit(self, model: ClassifierModule, **kwargs: Any) -> None:
        """The ``fit`` subcommand: ``trainer.fit``, and a resume command when a signal stops it."""

        def command(ckpt: str) -> str:
            args = [*without_flag(self.argv, "--ckpt_path", optional_value=False), f"--ckpt_path={ckpt}"]
            return shlex.join(["python", "-m", "cifar_lightning", *args])

        fit_or_exit(self.trainer, lambda: self.trainer.fit(model, **kwargs), command)


def _logger_configs(cfg) -> list[Any]:
    loggers = cfg.trainer.logger
    return [lg for lg in (loggers if isinstance(loggers, list) else [loggers]) if hasattr(lg, "get")]


def _logger_dirs(cfg) -> list[tuple[str, str | None]]:
    """(save_dir, name) of every logger configured with a ``save_dir``."""
    out = []
    for lg in _logger_configs(cfg):
        init = lg.get("init_args") or {}
        if init.get("save_dir"):
            out.append((str(init.get("save_dir")), init.get("name")))
    return out


def _run_root(cfg) -> tuple[str, str | None]:
    """Where runs of this configuration live: the first logger's (save_dir, name)."""
    dirs = [d for d in _logger_dirs(cfg) if d[1]]
    return dirs[0] if dirs else (cfg.trainer.default_root_dir or ".", None)


def _log_into(cfg, save_dir: str, name: str, version: int) -> None:
    """Point the versioned loggers (CSV, TensorBoard) at an existing run directory."""
    for lg in _logger_configs(cfg):
        module, _, cls = str(lg.get("class_path", "")).rpartition(".")
        try:
            klass = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError, ValueError):
            continue
        if isinstance(klass, type) and issubclass(klass, (CSVLogger, TensorBoardLogger)):
            lg.init_args = lg.get("init_args") or Namespace()
            lg.init_args.save_dir, lg.init_args.name, lg.init_args.version = save_dir, name, version


def _stored_checkpoint_dir(checkpoint: dict[str, Any]) -> str | None:
    """The ModelCheckpoint folder recorded in a checkpoint (its best-model tracking is keyed to it)."""
    states = checkpoint.get("callbacks") or {}
    return next((s.get("dirpath") for k, s in states.items() if str(k).startswith("ModelCheckpoint")), None)


def _check_devices(accelerator: Any, devices: Any) -> None:
    """Devices that do not exist: a GPU on a machine without one, more CPU processes than cores.

    More CPU processes than cores would run (gloo does not mind) but every process slows the
    others down and holds its own copy of the data, so it is refused.
    """
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--accelerator {accelerator} asks for a GPU, but PyTorch sees none (torch.cuda.is_available() "
            "is False). Pass --accelerator cpu, or run on a machine with a GPU and a CUDA build of PyTorch."
        )
    on_cpu = accelerator == "cpu" or (
        accelerator in (None, "auto") and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )
    count = devices if isinstance(devices, int) else int(devices) if str(devices).strip().isdigit() else None
    cores = os.cpu_count() or 1
    if on_cpu and count is not None and count > cores:
        raise UserError(
            f"--devices {count} asks for {count} CPU processes, but this machine has {cores} CPU cores. "
            f"Pass --devices {cores} or fewer, or run on GPUs with --accelerator gpu."
        )


def without_flag(argv: list[str], flag: str, optional_value: bool) -> list[str]:
    """``argv`` without ``flag`` and its value, given as ``flag=V`` or ``flag V``.

    With ``optional_value`` (``--resume [PATH]``), a next token that starts with ``--`` is a flag
    of its own, not the value.
    """
    out, i = [], 0
    while i < len(argv):
        name = argv[i].partition("=")[0]
        if name == flag:
            has_next = i + 1 < len(argv) and "=" not in argv[i]
            if has_next and not (optional_value and argv[i + 1].startswith("--")):
                i += 1
        else:
            out.append(argv[i])
        i += 1
    return out


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
    "--num-nodes": ("--trainer.num_nodes",),
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
    "--deterministic": ("--trainer.deterministic=true",),
}
#: ``--resume [PATH]``: ``--ckpt_path PATH``, or ``--ckpt_path last`` (the run's latest last.ckpt).
RESUME_FLAG = "--resume"
#: Flags that together describe ``--trainer.logger`` (see ``logger_spec``).
LOGGER_FLAGS = ("--logger", "--name", "--wandb-project", "--wandb-entity", "--group", "--tags", "--watch")
LOGGER_SWITCHES = ("--log-graph",)
LOGGERS = {
    "csv": "cifar_lightning.resilience.ResumableCSVLogger",
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
        if flag == RESUME_FLAG:
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                value = argv[i]
            out.append(f"--ckpt_path={value or 'last'}")
        elif (flag in FIT_SWITCHES or flag in LOGGER_SWITCHES) and not eq:
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
        "\nResuming:\n"
        "  --resume [PATH]    continue from last.ckpt: of the latest run of this name, or of the run\n"
        "                     directory / checkpoint file PATH (same flags as the first run)\n"
        "\nAll arguments of `python -m cifar_lightning fit` follow.\n"
    )


def _apply_no_validation(cfg: Namespace) -> None:
    """With ``--data.val_size 0`` there is nothing to select on: checkpoints keep the last epoch,
    and a scheduler that follows a validation metric is refused."""
    data = cfg.get("data")
    if data is None or data.get("val_size") != 0:
        return
    model = cfg.get("model") or {}
    if model.get("scheduler") == "plateau" and str(model.get("plateau_monitor", "val/")).startswith("val/"):
        raise UserError(
            "scheduler 'plateau' follows a validation metric, and --data.val_size 0 turns validation "
            "off. Use another scheduler or hold out validation images."
        )
    ckpt = cfg.get("checkpoint")
    if ckpt is not None and str(ckpt.get("monitor") or "").startswith("val/"):
        ckpt.monitor = None
        ckpt.filename = "epoch{epoch:03d}"


def in_fit_terms(message: str) -> str:
    """``message`` with each CLI argument that has a short flag named by that flag instead
    (``--data.val_size`` -> ``--val-size``), as a ``scripts/fit.py`` user typed it."""
    for alias, targets in FIT_ALIASES.items():
        if len(targets) == 1:
            message = re.sub(re.escape(targets[0]) + r"(?![\w.])", alias, message)
    return message


@exit_on_user_error
def fit_main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """``scripts/fit.py``: fit, test the best checkpoint, print and save the report (rank 0)."""
    try:
        return _fit_test_report(argv)
    except UserError as err:
        raise UserError(in_fit_terms(str(err))) from None


def _fit_test_report(argv: list[str] | None) -> dict[str, Any] | None:
    import time

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
    ckpt_path = cli.config.get("ckpt_path")

    def resume_command(ckpt: str) -> str:
        location = Path(ckpt).parent.parent if Path(ckpt).parent.name == "checkpoints" else Path(ckpt)
        args = [*without_flag(argv, RESUME_FLAG, optional_value=True), RESUME_FLAG, str(location)]
        return shlex.join(["python", "scripts/fit.py", *args])

    start = time.perf_counter()
    fit_or_exit(trainer, lambda: trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path), resume_command)
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
            "val_images": len(datamodule.val_set) if datamodule.val_set is not None else 0,
            "test_images": len(datamodule.test_set),
            # Fewer than the split when the run limits its batches (limit_*_batches, fast_dev_run).
            "val_images_seen": model.images_seen.get("val", 0),
            "test_images_seen": model.images_seen.get("test", 0),
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
