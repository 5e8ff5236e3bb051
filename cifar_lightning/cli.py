"""Command line: one LightningCLI over ``ClassifierModule`` and ``CIFAR10DataModule``.

``python -m cifar_lightning fit|validate|test|predict --config recipe.yaml`` is the full CLI.
``scripts/fit.py`` (``cifar_lightning.fit``) maps its short flags onto the same arguments and adds
the test-and-report step after fitting. ``scan_args`` is the one reader of raw argument lists.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn, Optional

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from cifar_lightning.arguments import config_files, explain_parse_error, in_cli_terms, value_of, without_flag
from cifar_lightning.callbacks import (
    CHECKPOINT_DEFAULTS,
    ConfigSavingCallback,
    TestResultsLogger,
    default_callbacks,
    fit_or_exit,
)
from cifar_lightning.checkpoint import (
    LIGHTNING_CKPT_NAMES,
    check_data_matches,
    check_resumable,
    find_resume_checkpoint,
    read_checkpoint,
    run_location,
    stored_data_dir,
    stored_dataset,
    with_atomic_checkpoint_io,
)
from cifar_lightning.constants import IMAGE_SIZE
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.errors import UserError, exit_on_user_error
from cifar_lightning.module import ClassifierModule
from cifar_lightning.trainer import Trainer, resolve_precision


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> None:
    """``UserError`` unless ``path`` is, or can be created as, a writable folder (nothing is created)."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        reason = f"{probe} is a file, not a folder"
    elif not os.access(probe, os.W_OK | os.X_OK):
        reason = f"{probe} is not writable"
    else:
        return
    raise UserError(f"cannot write to the {what} {path}: {reason}. Pass --output-dir with a writable folder.")


# ---------------------------------------------------------------------------------------------
# The LightningCLI
# ---------------------------------------------------------------------------------------------


#: Trainer settings that differ from Lightning's defaults.
TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs",
    "max_epochs": 30,
    "logger": {
        # Lightning's CSVLogger, except that a resumed run continues its metrics.csv.
        "class_path": "cifar_lightning.loggers.ResumableCSVLogger",
        "init_args": {"save_dir": "runs", "name": "cifar10"},  # DEFAULT_RUN_NAME: runs are named by _name_runs
    },
    # Metrics are epoch-level; a larger interval keeps the step-level LR/loss logging cheap.
    "log_every_n_steps": 50,
}


#: Lines Lightning prints on every run that say nothing about the run: the advertisement for its
#: hosted logger, a note on reading the training loader once to count the steps that the
#: schedules span, and the end of a fit that ran its epochs or steps, which it writes into the live
#: progress bar's line (the bar is then drawn again below it); the epochs and steps run are in the
#: report. Other reasons to stop (no training batches) still print.
_NOTES = (
    "💡 Tip: For seamless cloud logging",
    "Loading `train_dataloader` to estimate number of stepping batches",
    "`Trainer.fit` stopped: `max_epochs=",
    "`Trainer.fit` stopped: `max_steps=",
)


def _not_a_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOTES)


def quiet_lightning_notes() -> None:
    """Filter out what Lightning prints on every run that says nothing about the run.

    Each filter matches one exact message: the litlogger tip, the stepping-batches note, and torch
    2.14's deprecation of ``LeafSpec``, which Lightning 2.6's own batch flattening triggers (not
    our call to change).
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if _not_a_note not in log.filters:
            log.addFilter(_not_a_note)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # Our metrics are logged once an epoch; the step-level logging this interval paces is the
    # learning rate's alone, so a run with fewer batches than the interval loses nothing.
    warnings.filterwarnings(
        "ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval"
    )


class ArgumentsError(UserError):
    """jsonargparse's complaint about the arguments, before it is made into one line."""

    def __init__(self, message: str, parser: Any) -> None:
        super().__init__(message)
        self.message, self.parser = message, parser


class CifarArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line, first: ``CifarCLI`` names the YAML file
    and the key, and the nearest valid key. The usage text comes with ``--help`` only (92 lines
    of it above the error hid the error)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse's own inner parsers catch these and try again
            super().error(message, ex)
        raise ArgumentsError(message, getattr(ex, "subcommand_parser", None) or self)

    def dump(self, cfg: Namespace, *args: Any, **kwargs: Any) -> str:
        """The config as YAML, with ``precision: auto`` written as what it resolves to on this
        machine: ``--print_config`` shows the precision that will be used, and a run's
        ``config.yaml`` records the one it used."""
        for prefix in ("", *(f"{s}." for s in ("fit", "validate", "test", "predict"))):
            key = f"{prefix}trainer.precision"
            if isinstance(cfg, Namespace) and key in cfg and cfg[key] == "auto":
                cfg = cfg.clone()
                cfg[key] = resolve_precision("auto", cfg.get(f"{prefix}trainer.accelerator"))[0]
        return super().dump(cfg, *args, **kwargs)


def parser_keys(parser: Any) -> list[str]:
    """Every option a parser takes, as dotted keys (``model.weight_decay``)."""
    return [a.dest for a in parser._actions if a.dest not in ("help", "config", "print_config", "subcommand")]


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
        #: How the user runs this CLI, for the ``--help`` hint of an argument error.
        self.command: str = kwargs.pop("command", "python -m cifar_lightning")
        #: (path, contents) of the checkpoint that validate/test/predict read.
        self.eval_checkpoint: tuple[str, dict[str, Any]] | None = None
        kwargs.setdefault("parser_class", CifarArgumentParser)
        kwargs.setdefault("trainer_class", Trainer)
        quiet_lightning_notes()
        try:
            super().__init__(ClassifierModule, CIFAR10DataModule, *args, **kwargs)
        except ArgumentsError as err:
            command = " ".join(filter(None, [self.command, _subcommand_in(self.argv)]))
            raise UserError(explain_parse_error(err.message, parser_keys(err.parser), self.argv, command)) from None

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:
            # scripts/fit.py builds without subcommands and calls fit itself; --resume sets this.
            self.parser.add_argument(
                "--ckpt_path",
                type=Optional[str],
                default=None,
                help="Resume from this checkpoint: a .ckpt file, a run directory, or 'last'.",
            )

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
            ("data.superclass_names", "model.superclass_names"),
            ("data.superclasses", "model.superclasses"),
            ("data.image_size", "model.image_size"),
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
        subcommand = self.config.get("subcommand", "fit")
        if (
            ckpt
            and subcommand != "fit"
            and ckpt not in (*LIGHTNING_CKPT_NAMES, "last")
            and not str(ckpt).startswith("registry")
        ):
            self.eval_checkpoint = (str(ckpt), read_checkpoint(ckpt))  # 'last': Lightning's own meaning
        stored_arch = self.eval_checkpoint[1]["hyper_parameters"].get("arch") if self.eval_checkpoint else None
        _name_runs(cfg, self.argv, stored_arch)
        if not ckpt or ckpt in LIGHTNING_CKPT_NAMES or str(ckpt).startswith("registry") or subcommand != "fit":
            return
        path = find_resume_checkpoint(ckpt, *_run_root(cfg))
        checkpoint = read_checkpoint(path)
        self.resume_from = (str(path), checkpoint["hyper_parameters"])
        cfg.ckpt_path = str(path)
        location = run_location(path, _stored_checkpoint_dir(checkpoint))
        if location is not None:
            _log_into(cfg, *location)

    def before_instantiate_classes(self) -> None:
        cfg = self._subconfig()
        if self.eval_checkpoint is not None:
            adopt_checkpoint_data(cfg.data, *self.eval_checkpoint)
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
        except (TypeError, ValueError) as err:
            # A class the parser builds (a callback in a list) that refuses its arguments with a
            # UserError reaches here wrapped in the parser's own error: unwrap it.
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__  # only what the parser raised from, never an unrelated context
            if cause is None:
                raise
            raise cause from None

    def after_instantiate_classes(self) -> None:
        if self.resume_from is not None:
            # A resumed run writes into its own checkpoint folder again, which is meant to hold
            # that run's checkpoints: Lightning's note that the folder is not empty does not apply.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        if self.eval_checkpoint is not None:
            path, ckpt = self.eval_checkpoint
            check_data_matches(ckpt["hyper_parameters"], self.datamodule.class_names, path, self.datamodule.source.root)
        if self.resume_from is not None:
            path, stored = self.resume_from
            check_resumable(stored, path, self.model.hparams)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]):
        config = {**config, "plugins": with_atomic_checkpoint_io(config.get("plugins"))}
        return super()._instantiate_trainer(config, callbacks + default_callbacks(config))

    def fit(self, model: ClassifierModule, **kwargs: Any) -> None:
        """The ``fit`` subcommand: ``trainer.fit``, and a resume command when a signal stops it."""

        def command(ckpt: str) -> str:
            args = [*without_flag(self.argv, "--ckpt_path"), f"--ckpt_path={ckpt}"]
            return shlex.join(["python", "-m", "cifar_lightning", *args])

        fit_or_exit(self.trainer, lambda: self.trainer.fit(model, **kwargs), command)
        print_run_paths(self.trainer)


def print_run_paths(trainer) -> None:
    """Where a fit left its results: the run directory and the best and last checkpoints (rank 0)."""
    if not trainer.is_global_zero:
        return
    ckpt = trainer.checkpoint_callback
    best = getattr(ckpt, "best_model_path", "") or "(none saved)"
    last = getattr(ckpt, "last_model_path", "") or ""
    print(f"run: {trainer.log_dir or trainer.default_root_dir}")
    print(f"checkpoint: {best}" + (f" (last: {last})" if last and last != best else ""))


#: The CSV logger's name in ``TRAINER_DEFAULTS``; a run left with it is named as fit.py names it.
DEFAULT_RUN_NAME = "cifar10"


def _name_runs(cfg: Namespace, argv: list[str], arch: str | None = None) -> None:
    """Name the runs of a logger left at ``DEFAULT_RUN_NAME`` as ``scripts/fit.py`` does:
    ``runs/<arch>/version_N`` when the architecture is given as a flag, else after the first
    ``--config`` file, else after the architecture (a checkpoint's, for validate/test/predict)."""
    config = next(iter(config_files(argv)), None)
    name = value_of(argv, "--model.arch") or (Path(config).stem if config else None) or arch or cfg.model.arch
    for lg in _logger_configs(cfg):
        init = lg.get("init_args")
        if init is not None and init.get("name") == DEFAULT_RUN_NAME:
            init.name = name


def _subcommand_in(argv: list[str]) -> str | None:
    return next((a for a in argv if a in ("fit", "validate", "test", "predict")), None)


#: The data module's defaults that a checkpoint's own values replace in validate/test/predict.
_DATA_DEFAULTS = {"data_dir": "data", "image_size": IMAGE_SIZE}


def adopt_checkpoint_data(data: Namespace, path: str, ckpt: dict[str, Any]) -> None:
    """Make ``validate``/``test``/``predict`` of a checkpoint read the data as its run read it.

    The checkpoint's normalisation, dataset and image size replace the data module's defaults,
    and its data folder the default ``data`` (as ``scripts/evaluate.py`` reads them). A value given
    on the command line or in a config that contradicts the checkpoint is refused: testing a model
    on inputs normalised otherwise than in training gives wrong numbers without a sign.
    """
    hp = ckpt["hyper_parameters"]
    stored = stored_dataset(ckpt)
    name = f"checkpoint {path}"
    if data.get("data_dir") in (None, _DATA_DEFAULTS["data_dir"]):
        trained_on = stored_data_dir(ckpt, path)
        if trained_on and not Path(trained_on).expanduser().exists():
            raise UserError(
                f"{name} was trained on the data in {trained_on}, which is not there as seen from this folder. "
                "Pass --data-dir with that data."
            )
        data.data_dir = trained_on or data.get("data_dir")
    if "dataset" in stored:
        if data.get("dataset") is None:
            data.dataset = stored["dataset"]
        elif data.dataset != stored["dataset"]:
            raise UserError(f"{name} was trained on --dataset {stored['dataset']}, not {data.dataset}: drop --dataset.")
    size = stored.get("image_size", IMAGE_SIZE)
    if data.get("image_size") in (None, _DATA_DEFAULTS["image_size"]):
        data.image_size = size
    elif data.image_size != size:
        raise UserError(f"{name} was trained on {size} px images, not {data.image_size}: drop --image-size.")
    mean, std = hp.get("norm_mean"), hp.get("norm_std")
    if mean is None or std is None:
        return
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    identity = mean == [0.0] * 3 and std == [1.0] * 3
    if data.get("normalize", True) is False and not identity:
        raise UserError(
            f"{name} was trained on images normalised with mean {mean} and std {std}: drop --data.normalize false."
        )
    given = data.get("mean"), data.get("std")
    if given == (None, None):
        data.mean, data.std, data.normalize = mean, std, True
    elif not all(math.isclose(float(a), b, abs_tol=1e-6) for x, y in zip(given, (mean, std)) for a, b in zip(x, y)):
        raise UserError(
            f"{name} was trained on images normalised with mean {mean} and std {std}, but --data.mean "
            f"{list(given[0])} --data.std {list(given[1])} were given. Drop them: the checkpoint's are used."
        )


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


@exit_on_user_error
def cli_main(args: list[str] | None = None, **kwargs: Any) -> CifarCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``); returns it for ``run=False`` callers.

    Messages name ``scripts/fit.py``'s short flags; here they name the CLI's arguments."""
    try:
        return CifarCLI(args=args, **kwargs)
    except UserError as err:
        raise type(err)(in_cli_terms(str(err))) from None  # the same kind, so the same exit code
