"""Model zoo. Importing this package registers every family; add one import line per new family."""

from cifar_lightning.models.registry import (
    ModelInfo,
    UnknownModelError,
    check_input_size,
    create_model,
    list_models,
    model_info,
    register_model,
)

# One import line per family file: importing it runs its @register_model decorators.
from cifar_lightning.models import dainet  # noqa: F401,E402
from cifar_lightning.models import densenet  # noqa: F401,E402
from cifar_lightning.models import fastnet  # noqa: F401,E402
from cifar_lightning.models import lenet  # noqa: F401,E402
from cifar_lightning.models import mobilenet  # noqa: F401,E402
from cifar_lightning.models import preact_resnet  # noqa: F401,E402
from cifar_lightning.models import resnet  # noqa: F401,E402
from cifar_lightning.models import resnet_cifar  # noqa: F401,E402
from cifar_lightning.models import simple  # noqa: F401,E402
from cifar_lightning.models import tutorial  # noqa: F401,E402
from cifar_lightning.models import vgg  # noqa: F401,E402
from cifar_lightning.models import vit  # noqa: F401,E402
from cifar_lightning.models import wide_resnet  # noqa: F401,E402

# Parameter and MAC counts, and the model card built from them.
from cifar_lightning.models.card import count_macs, count_parameters  # noqa: E402

# The shipped trained weights (cifar_lightning/weights/): create_model(name, pretrained=True) loads them.
from cifar_lightning.models.pretrained import Normalized, WeightsError, list_pretrained, weights_entry  # noqa: E402

__all__ = [
    "ModelInfo",
    "Normalized",
    "UnknownModelError",
    "check_input_size",
    "WeightsError",
    "count_macs",
    "count_parameters",
    "create_model",
    "list_models",
    "list_pretrained",
    "model_info",
    "register_model",
    "weights_entry",
]
