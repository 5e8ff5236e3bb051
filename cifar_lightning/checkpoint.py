"""Checkpoints: read safely with one clear error for every way a file can be wrong, written
atomically, and found again when a run resumes.

A checkpoint of this project is a Lightning checkpoint whose ``hyper_parameters`` hold plain
data (the arch, its kwargs, the class names, the normalisation) and whose ``state_dict`` holds
tensors, so ``torch.load(weights_only=True)`` reads all of it. Nothing here ever falls back to
unrestricted unpickling: a file that needs it is refused, because unpickling runs code.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from cifar_lightning.constants import IMAGE_SIZE
from cifar_lightning.errors import UserError
from cifar_lightning.models import list_models, list_pretrained
from cifar_lightning.models.pretrained import read_weights, weights_entry
from cifar_lightning.module import ClassifierModule

#: Hyperparameters that rebuild the network; a checkpoint without them was not written by us.
REQUIRED_HPARAMS = ("arch", "num_classes")

_HOW_TO_GET_ONE = "Pass a .ckpt file written by scripts/fit.py (runs/<arch>/version_N/checkpoints/)."


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a checkpoint of this project, checked; or, for
    the name of a network that is not a file (``resnet20``), ``pretrained_checkpoint`` of it.

    Raises ``UserError`` naming the file when it is missing, a folder, empty, truncated or
    corrupt, needs unsafe unpickling (a whole pickled model, another program's pickle), or is
    readable but not a checkpoint of this project (a plain state dict, some other dict).
    """
    path = Path(path)
    if not path.exists() and str(path) in list_models():
        return pretrained_checkpoint(str(path))
    if not path.exists():
        named = list_pretrained()
        hint = f" Or name a network with trained weights: {', '.join(named)}." if named else ""
        raise UserError(f"checkpoint {path} does not exist. {_HOW_TO_GET_ONE}{hint}")
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*.ckpt"))[:5]
        hint = f" It holds: {', '.join(found)}." if found else ""
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file.{hint} {_HOW_TO_GET_ONE}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes). {_HOW_TO_GET_ONE}")
    try:
        with warnings.catch_warnings():
            # Other programs' pickles make torch warn about their protocol before failing anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(_unpickling_message(path, err)) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise UserError(f"cannot read checkpoint {path}: {err.strerror}.") from None
        damaged = zipfile.is_zipfile(path) or _looks_like_torch_zip(path)
        kind = "truncated or corrupt" if damaged else "not a PyTorch checkpoint"
        raise UserError(
            f"checkpoint {path} is {kind} ({type(err).__name__}: {_first_line(err)}). {_HOW_TO_GET_ONE}"
        ) from None
    _check_structure(path, ckpt)
    return ckpt


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ClassifierModule:
    """Rebuild the ``ClassifierModule`` of a checkpoint (or of a network's shipped weights, by its
    name) in eval mode, without unsafe unpickling."""
    return build_classifier(read_checkpoint(path, map_location), path, map_location)


def pretrained_checkpoint(name: str, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The shipped weights of network ``name`` (in ``folder``, default the package's) as the
    checkpoint dict ``read_checkpoint`` returns: the manifest's class names, normalisation, image
    size and TTA mode are its hyperparameters, so evaluate, predict and export use them as they use
    a checkpoint's. ``WeightsError`` when ``name`` has no weights (naming those that have) or its
    file fails the sha256 check."""
    entry = weights_entry(name, folder)
    hparams = {
        "arch": name,
        "arch_kwargs": entry.get("arch_kwargs") or None,
        "num_classes": int(entry["num_classes"]),
        "class_names": list(entry["class_names"]),
        "norm_mean": tuple(entry["mean"]),
        "norm_std": tuple(entry["std"]),
        "image_size": int(entry["image_size"]),
        "tta": entry.get("tta", "none"),
    }
    # The images the network was trained on: a calibration refuses a validation split drawn from them.
    data = {"val_size": entry["training"]["val_size"]} if "val_size" in entry.get("training", {}) else {}
    state = {f"model.{k}": v for k, v in read_weights(name, folder).items()}
    return {"hyper_parameters": hparams, "state_dict": state, "datamodule_hyper_parameters": data, "pretrained": entry}


def build_classifier(
    ckpt: dict[str, Any], path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> ClassifierModule:
    """The eval-mode ``ClassifierModule`` of a checkpoint dict from ``read_checkpoint``.

    ``compile`` is switched off: evaluation, prediction and export run the plain network (the
    compiled wrapper holds no weights of its own, so the state dict is the same).
    """
    # Lightning's own keys (``_instantiator``...) are not arguments of the module.
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    hparams["compile"] = False
    hparams["pretrained"] = False  # the checkpoint's own weights are loaded below
    try:
        module = ClassifierModule(**hparams)
    except TypeError as err:
        raise UserError(f"checkpoint {path} has hyperparameters this version does not know ({err}).") from None
    except UserError as err:
        raise UserError(f"checkpoint {path}: {err}") from None
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise UserError(
            f"checkpoint {path}: its weights do not fit the architecture {hparams['arch']!r} "
            f"({_first_line(err)}). The file was edited or written by another version of the model."
        ) from None
    return module.to(map_location).eval()


def stored_data_dir(ckpt: dict[str, Any], path: str | os.PathLike) -> str | None:
    """The ``data_dir`` the checkpoint was trained on: from the checkpoint, else the run's config.yaml.

    Relative paths are as the training command saw them (relative to its working directory).
    """
    if "pretrained" in ckpt:  # shipped weights: the user's data, not a run's
        return None
    data_dir = (ckpt.get("datamodule_hyper_parameters") or {}).get("data_dir")
    if data_dir:
        return str(data_dir)
    config = Path(path).resolve().parent.parent / "config.yaml"  # runs/<arch>/version_N/checkpoints/x.ckpt
    if config.is_file():
        import yaml

        try:
            data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
        except yaml.YAMLError:
            return None
        value = data.get("data_dir") or (data.get("init_args") or {}).get("data_dir")
        return str(value) if value else None
    return None


def stored_dataset(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Data-module arguments that read the data as the checkpoint's run read it: ``dataset``
    (``cifar10``, ``cifar100``, ``folder``) and ``image_size`` where recorded (older checkpoints
    recorded neither: the data module's defaults)."""
    from cifar_lightning.data.datasets import detect_dataset

    stored = ckpt.get("datamodule_hyper_parameters") or {}
    names = (ckpt.get("hyper_parameters") or {}).get("class_names")
    # A run that let the data say what it was recorded no name: its class names say it.
    dataset = stored.get("dataset") or (detect_dataset(tuple(names)) if names else None)
    out: dict[str, Any] = {"dataset": str(dataset)} if dataset else {}
    size = stored.get("image_size") or (ckpt.get("hyper_parameters") or {}).get("image_size")
    if size:
        out["image_size"] = int(size)
    return out


def check_compatible(
    module: ClassifierModule,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    checkpoint: str | os.PathLike | None = None,
    against: str = "the data",
) -> None:
    """Raise ``UserError`` when ``module`` was made for another arch, class count or class list.

    ``against`` says what the expectation comes from (e.g. ``"the data in data/"``), and the
    message names both sides so the user sees which checkpoint or data folder to change.
    """
    name = f"checkpoint {checkpoint}" if checkpoint else "the checkpoint"
    hp = module.hparams
    if arch is not None and hp.arch != arch:
        raise UserError(f"{name} is a {hp.arch!r} model, but {against} expects {arch!r}.")
    _check_classes(list(module.class_names), class_names, name, against)
    if num_classes is not None and hp.num_classes != num_classes:
        raise UserError(f"{name} predicts {hp.num_classes} classes, but {against} has {num_classes}.")


def check_data_matches(
    hparams: dict[str, Any], class_names: Sequence[str], checkpoint: str | os.PathLike, data_dir: str | os.PathLike
) -> None:
    """``UserError`` when the data in ``data_dir`` has other classes than the checkpoint (its
    ``hparams``) was trained on."""
    names = list(hparams.get("class_names") or [])
    if names:
        _check_classes(names, class_names, f"checkpoint {checkpoint}", f"the data in {data_dir}")


def _check_classes(ours: list[str], class_names: Sequence[str] | None, name: str, against: str) -> None:
    if class_names is not None:
        theirs = list(class_names)
        if theirs != ours:
            order = " (the same names in another order)" if sorted(theirs) == sorted(ours) else ""
            raise UserError(
                f"{name} was trained on {len(ours)} classes {ours}, but {against} has "
                f"{len(theirs)} classes {theirs}{order}. Use a checkpoint trained on this data, "
                "or data with the checkpoint's classes."
            )


def _check_structure(path: Path, ckpt: Any) -> None:
    if not isinstance(ckpt, dict):
        raise UserError(
            f"{path} is not a checkpoint of this project: it holds a {type(ckpt).__name__}, not a "
            f"checkpoint dict. {_HOW_TO_GET_ONE}"
        )
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UserError(
            f"{path} is a plain state dict (tensors only): it lacks the architecture, class names "
            f"and normalisation needed to rebuild the model. {_HOW_TO_GET_ONE}"
        )
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(ckpt.get("state_dict"), dict) or not isinstance(hparams, dict):
        raise UserError(
            f"{path} is not a checkpoint of this project: it has no 'state_dict' and "
            f"'hyper_parameters' (keys: {', '.join(map(str, list(ckpt)[:8]))}). {_HOW_TO_GET_ONE}"
        )
    missing = [k for k in REQUIRED_HPARAMS if k not in hparams]
    if missing:
        raise UserError(
            f"{path} is a Lightning checkpoint of another model: its hyper_parameters lack "
            f"{', '.join(missing)}. {_HOW_TO_GET_ONE}"
        )


def _unpickling_message(path: Path, err: Exception) -> str:
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if unsafe:
        return (
            f"{path} is not a checkpoint of this project: it holds pickled Python objects "
            f"({unsafe.group(1)}), such as a whole model saved with torch.save(model), which are "
            f"not loaded because unpickling them would run code. {_HOW_TO_GET_ONE}"
        )
    return f"checkpoint {path} is not a PyTorch checkpoint (its contents cannot be unpickled). {_HOW_TO_GET_ONE}"


def _looks_like_torch_zip(path: Path) -> bool:
    # A zip archive starts with 'PK\x03\x04'; a truncated one has lost its central directory,
    # so zipfile.is_zipfile() says no, but the header still shows what the file was meant to be.
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _first_line(err: Exception) -> str:
    """The first sentence of an exception's message: torch's run to a paragraph."""
    text = str(err).strip()
    return re.split(r"(?<=[.!?])\s|\n", text, maxsplit=1)[0].rstrip(".") if text else "no details"


# ---------------------------------------------------------------------------------------------
# Writing atomically, and finding what to resume
# ---------------------------------------------------------------------------------------------


#: ``ckpt_path`` values of a fit that Lightning resolves by itself ("last" is resolved here).
LIGHTNING_CKPT_NAMES = ("best", "hpc")


LAST = "last.ckpt"


_VERSION_DIR = re.compile(r"version_(\d+)")


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the file that was there before is unchanged."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, fsyncs it, then renames it.

    ``os.replace`` within one folder is atomic, so a kill or a full disk during a save leaves the
    previous ``last.ckpt`` intact: a reader sees the old file or the new one, never half of one.
    Lightning's own save goes through a temporary file in ``/tmp`` and ``shutil.move``, which is a
    plain copy when ``/tmp`` is another file system, and does not fsync.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as err:
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {err.strerror or err}.") from None
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError):
                hint = " Free some space or pass --output-dir on another disk." if err.errno == errno.ENOSPC else ""
                raise CheckpointWriteError(
                    f"cannot write checkpoint {path}: {err.strerror or err}. The previous "
                    f"checkpoint there, if any, is unchanged.{hint}"
                ) from None
            raise
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some file systems cannot open a folder, which is harmless.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """The trainer's ``plugins`` plus ``AtomicCheckpointIO``, unless they already name a ``CheckpointIO``."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def _latest_last_checkpoint(name_dir: Path) -> Path | None:
    found = [
        (int(m.group(1)), d / "checkpoints" / LAST)
        for d in name_dir.glob("version_*")
        if (m := _VERSION_DIR.fullmatch(d.name)) and (d / "checkpoints" / LAST).is_file()
    ]
    return max(found)[1] if found else None


def find_resume_checkpoint(target: str | None, save_dir: str | os.PathLike, name: str | None) -> Path:
    """The checkpoint that ``--resume [target]`` (``--ckpt_path target``) continues from.

    ``target`` is ``None`` or ``"last"`` for the latest ``<save_dir>/<name>/version_N`` holding
    ``checkpoints/last.ckpt``, a run directory (its ``last.ckpt``), a folder of runs (the latest),
    or a checkpoint file. Raises ``UserError`` that names where it looked when there is none.
    """
    if target in (None, "", "last"):
        if name is None:
            where = Path(save_dir) / "checkpoints" / LAST
            found = where if where.is_file() else None
        else:
            where = Path(save_dir) / name / "version_*" / "checkpoints" / LAST
            found = _latest_last_checkpoint(Path(save_dir) / name)
        if found is None:
            raise UserError(
                f"no checkpoint to resume: nothing matches {where}. Start the run without --resume, "
                "or pass --resume PATH with a run directory or a .ckpt file."
            )
        return found
    path = Path(target).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / LAST, path / LAST):
            if candidate.is_file():
                return candidate
        latest = _latest_last_checkpoint(path)
        if latest is not None:
            return latest
        raise UserError(
            f"no checkpoint to resume in {path}: looked for {path / 'checkpoints' / LAST}, {path / LAST} "
            f"and {path / 'version_*' / 'checkpoints' / LAST}. Pass a run directory or a .ckpt file."
        )
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist. Pass a run directory or a .ckpt file to resume.")
    return path


def run_location(checkpoint: str | os.PathLike, stored_dir: str | None = None) -> tuple[str, str, int] | None:
    """``(save_dir, name, version)`` of a checkpoint under ``<save_dir>/<name>/version_N/checkpoints/``.

    ``stored_dir`` is the checkpoint folder the run recorded (``ModelCheckpoint.dirpath``). When it
    is the same folder, its spelling is kept (relative or absolute): Lightning restores the
    best-checkpoint tracking only when the folder string matches.
    """
    ckpt_dir = Path(checkpoint).parent
    if stored_dir and Path(stored_dir).resolve() == ckpt_dir.resolve():
        ckpt_dir = Path(stored_dir)
    run_dir = ckpt_dir.parent
    m = _VERSION_DIR.fullmatch(run_dir.name)
    if ckpt_dir.name != "checkpoints" or m is None:
        return None
    return str(run_dir.parent.parent), run_dir.parent.name, int(m.group(1))


#: Hyperparameters that must agree between a checkpoint and the model it is resumed into.
RESUME_KEYS = ("arch", "arch_kwargs", "num_classes", "class_names", "norm_mean", "norm_std", "image_size")

#: What a checkpoint made before a key existed stands for (its runs all had these values).
_RESUME_DEFAULTS = {"image_size": IMAGE_SIZE}


def check_resumable(stored: dict[str, Any], path: str | os.PathLike, hparams: dict[str, Any]) -> None:
    """``UserError`` when a checkpoint's hyperparameters (``stored``) build another network than
    ``hparams``, or feed it other inputs (normalisation, image size: an image folder's statistics
    are its own since they are computed, where older runs used CIFAR-10's)."""
    for key in RESUME_KEYS:
        a, b = stored.get(key, _RESUME_DEFAULTS.get(key)), hparams.get(key, _RESUME_DEFAULTS.get(key))
        if key == "class_names":
            a, b = list(a or []), list(b or [])
        elif key in ("norm_mean", "norm_std"):
            a, b = (tuple(round(float(v), 6) for v in x) if x is not None else None for x in (a, b))
        if (a or None) != (b or None):
            raise UserError(
                f"cannot resume from {path}: the checkpoint has {key}={a!r}, but this run builds "
                f"{key}={b!r}. Resume with the same --arch and data"
                + (
                    f" (--data.mean {list(stored['norm_mean'])} --data.std {list(stored['norm_std'])} give the checkpoint's)"
                    if key in ("norm_mean", "norm_std") and stored.get("norm_mean") and stored.get("norm_std")
                    else ""
                )
                + ", or start a new run without --resume."
            )
