"""cifar-lightning: train and compare CNNs on CIFAR-10 with PyTorch Lightning."""

__version__ = "0.1.0"

from cifar_lightning.constants import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.models import create_model, list_models, register_model
from cifar_lightning.module import ClassifierModule

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
