"""One registry for every network: ``register_model``, ``create_model``, ``list_models``, and
``check_input_size`` for a built network.

A builder is a function ``builder(*, num_classes: int = 10, **kwargs) -> nn.Module`` registered
under its own name. Each builder may carry metadata (family, source, paper) that the model card
script reads, so the card's numbers and sources come from the code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from cifar_lightning.errors import UserError
from cifar_lightning.models.pretrained import Normalized, fresh_head_note, load_weights, weights_entry

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one architecture."""

    name: str
    builder: Builder
    family: str
    source: str
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, ModelInfo] = {}


class UnknownModelError(UserError):
    """Raised for an architecture name that is not registered."""


def register_model(
    fn: Builder | None = None, *, family: str | None = None, source: str = "", tags: tuple[str, ...] = ()
):
    """Register a model builder under its function name.

    Usable bare (``@register_model``) or with metadata
    (``@register_model(family="resnet", source="He et al. 2016, arXiv:1512.03385")``).
    """

    def decorator(builder: Builder) -> Builder:
        name = builder.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        module_family = builder.__module__.rsplit(".", 1)[-1]
        _REGISTRY[name] = ModelInfo(name, builder, family or module_family, source, tuple(tags))
        return builder

    return decorator(fn) if fn is not None else decorator


def list_models() -> list[str]:
    """All registered architecture names, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; raises ``UnknownModelError`` listing the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown architecture {name!r}. Valid names: {', '.join(list_models())}") from None


def create_model(
    name: str, num_classes: int | None = None, *, pretrained: bool = False, normalize: bool = True, **kwargs
) -> nn.Module:
    """Build the registered network ``name`` for ``num_classes`` outputs (default: 10, or the
    weights' own with ``pretrained``).

    With ``pretrained``, the network holds its shipped weights, checked against their sha256
    (``list_pretrained()`` names the networks that have some; ``WeightsError`` names them for any
    other), is built with the arguments the weights were trained with (``kwargs`` override them),
    and is returned in eval mode. It then takes images as ``torchvision.transforms.ToTensor()``
    gives them, RGB in [0, 1] (B, 3, 32, 32), and normalises them itself (``Normalized``);
    ``normalize=False`` gives the bare network, for inputs normalised with the ``mean`` and ``std``
    of ``model.pretrained_cfg``. Either way the model carries ``class_names`` and ``pretrained_cfg``
    (the manifest entry: recipe, commit, data, accuracy). Another ``num_classes`` than the
    weights' starts the classifier afresh (``class_names`` is then None), with a warning.
    """
    info = model_info(name)
    if not pretrained:
        return info.builder(num_classes=10 if num_classes is None else num_classes, **kwargs)
    entry = weights_entry(name)
    num_classes = entry["num_classes"] if num_classes is None else num_classes
    network = info.builder(num_classes=num_classes, **{**(entry.get("arch_kwargs") or {}), **kwargs})
    fresh = load_weights(network, name)
    if fresh:
        warnings.warn(fresh_head_note(name, fresh, entry["num_classes"], num_classes), stacklevel=2)
    model = Normalized(network, entry["mean"], entry["std"]) if normalize else network
    model.class_names = None if fresh else list(entry["class_names"])
    model.pretrained_cfg = entry
    return model.eval()


def check_input_size(network: nn.Module, arch: str, size: int) -> None:
    """``UserError`` unless ``network`` maps a (1, 3, size, size) batch to one row of logits."""
    was_training = network.training
    network.eval()
    weight = next(network.parameters(), None)  # the probe goes where the network is (a GPU at fit start)
    device, dtype = (weight.device, weight.dtype) if weight is not None else (None, None)
    try:
        with torch.no_grad():
            out = network(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
        if out.ndim != 2 or out.shape[0] != 1:
            raise RuntimeError(f"it returned shape {tuple(out.shape)}")
    except (RuntimeError, ValueError, AssertionError) as err:
        reason = str(err).splitlines()[0][:200]
        raise UserError(
            f"{arch} cannot take {size}x{size} images ({reason}). Pick a network that pools globally (resnet18, "
            "resnet20, preact_resnet18, wrn16_8, densenet121, mobilenetv2, fastnet, ...) or keep --image-size 32."
        ) from None
    finally:
        network.train(was_training)
