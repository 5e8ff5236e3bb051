"""CIFAR-10 data: sources (one decoder), transforms (one normalisation), the tensor loader and the
data module. ``from cifar_lightning.data import CIFAR10DataModule`` is all most code needs."""

from cifar_lightning.constants import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, IMAGE_SIZE, IMAGE_SUFFIXES
from cifar_lightning.data.archives import extract_archive_cached, is_archive, safe_extract
from cifar_lightning.data.datamodule import ArrayDataset, CIFAR10DataModule
from cifar_lightning.data.sources import (
    DataSource,
    UnreadableImage,
    decode_image,
    load_image_folder_split,
    resolve_source,
)
from cifar_lightning.data.splits import evaluation_order, split_indices, val_count
from cifar_lightning.data.tensor_loader import EpochShards, TensorLoader
from cifar_lightning.data.transforms import (
    AUGMENT_PRESETS,
    build_transform,
    cutout_,
    denormalize,
    normalize,
    random_crop_flip,
    to_input,
)

__all__ = [
    "AUGMENT_PRESETS",
    "ArrayDataset",
    "CIFAR10DataModule",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DataSource",
    "EpochShards",
    "IMAGE_SIZE",
    "IMAGE_SUFFIXES",
    "TensorLoader",
    "UnreadableImage",
    "build_transform",
    "cutout_",
    "decode_image",
    "denormalize",
    "evaluation_order",
    "extract_archive_cached",
    "is_archive",
    "load_image_folder_split",
    "normalize",
    "random_crop_flip",
    "resolve_source",
    "safe_extract",
    "split_indices",
    "to_input",
    "val_count",
]
