"""cifar-lightning: train and compare CNNs on CIFAR-10 with PyTorch Lightning."""

__version__ = "0.1.0"

from cifar_lightning import compat  # noqa: E402

compat.install()  # class paths of configs written before the layout changed

from cifar_lightning.constants import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from cifar_lightning.data import CIFAR10DataModule  # noqa: E402
from cifar_lightning.models import create_model, list_models, register_model  # noqa: E402
from cifar_lightning.module import ClassifierModule  # noqa: E402

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10DataModule",
    "ClassifierModule",
    "create_model",
    "list_models",
    "register_model",
]
