"""Class paths from before the package's layout changed, so older configs and runs still load.

Configs and the ``config.yaml`` every run saves name classes by import path
(``class_path: cifar_lightning.training_tricks.Lookahead``). Those that moved are listed in
``MOVED``; the old modules that no longer exist are registered as stand-ins that resolve each name
to its new home, and ``plots`` forwards the one name it lost. Checkpoints need nothing: they hold
callback states under class names, which did not change, and no pickled classes.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

#: old dotted path -> new dotted path
MOVED: dict[str, str] = {
    "cifar_lightning.resilience.ResumableCSVLogger": "cifar_lightning.loggers.ResumableCSVLogger",
    "cifar_lightning.resilience.AtomicCheckpointIO": "cifar_lightning.checkpoint.AtomicCheckpointIO",
    "cifar_lightning.resilience.RandomState": "cifar_lightning.callbacks.RandomState",
    "cifar_lightning.resilience.ContinueLogs": "cifar_lightning.callbacks.ContinueLogs",
    "cifar_lightning.resilience.LastCheckpoint": "cifar_lightning.callbacks.LastCheckpoint",
    "cifar_lightning.tracking.WandbLogger": "cifar_lightning.loggers.WandbLogger",
    "cifar_lightning.tracking.TensorBoardLogger": "cifar_lightning.loggers.TensorBoardLogger",
    "cifar_lightning.tracking.TestResultsLogger": "cifar_lightning.callbacks.TestResultsLogger",
    "cifar_lightning.tracking.WatchModel": "cifar_lightning.callbacks.WatchModel",
    "cifar_lightning.tracking.ConfigSavingCallback": "cifar_lightning.callbacks.ConfigSavingCallback",
    "cifar_lightning.training_tricks.ScaleGradients": "cifar_lightning.callbacks.ScaleGradients",
    "cifar_lightning.training_tricks.FreezeAfter": "cifar_lightning.callbacks.FreezeAfter",
    "cifar_lightning.training_tricks.Lookahead": "cifar_lightning.callbacks.Lookahead",
    "cifar_lightning.plots.HistoryPlot": "cifar_lightning.callbacks.HistoryPlot",
}

#: Modules that no longer exist: each becomes a stand-in that forwards the names in ``MOVED``.
GONE_MODULES = ("cifar_lightning.resilience", "cifar_lightning.tracking", "cifar_lightning.training_tricks")


def moved(module: str, name: str) -> Any:
    """The object ``module.name`` moved to; ``AttributeError`` for a name that never existed there."""
    target = MOVED.get(f"{module}.{name}")
    if target is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new_module, _, new_name = target.rpartition(".")
    return getattr(importlib.import_module(new_module), new_name)


class _StandIn(ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return moved(self.__name__, name)


def install() -> None:
    """Register the stand-ins for ``GONE_MODULES`` (idempotent)."""
    for name in GONE_MODULES:
        sys.modules.setdefault(name, _StandIn(name, f"moved: see {__name__}.MOVED"))
