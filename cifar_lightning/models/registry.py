"""One registry for every network: ``register_model``, ``create_model``, ``list_models``, and
``check_input_size`` for a built network.

A builder is a function ``builder(*, num_classes: int = 10, **kwargs) -> nn.Module`` registered
under its own name. Each builder may carry metadata (family, source, paper) that the model card
script reads, so the card's numbers and sources come from the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from cifar_lightning.errors import UserError

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
        raise UnknownModelError(
            f"unknown architecture {name!r}. Valid names: {', '.join(list_models())}"
        ) from None


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build the registered network ``name`` for ``num_classes`` outputs."""
    return model_info(name).builder(num_classes=num_classes, **kwargs)


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
