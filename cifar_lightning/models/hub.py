"""torch.hub entry points for ``hubconf.py``: one function per registered network, made from the
registry, so that a new network is on the hub without an edit there."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from cifar_lightning.models.pretrained import list_pretrained, weights_entry
from cifar_lightning.models.registry import create_model, list_models, model_info


def _weights_doc(name: str) -> str:
    have = list_pretrained()
    if name not in have:
        return f"{name} has none (networks with weights: {', '.join(have) or 'none yet'})"
    e = weights_entry(name)
    acc, shipped = e["test_acc"], e["shipped"]
    tta = f", {100 * shipped['test_acc_tta']:.2f}% with TTA" if shipped.get("test_acc_tta") is not None else ""
    return (
        f"{100 * shipped['test_acc']:.2f}% plain{tta} on the test set of {e['data'].get('label') or e['data']['name']} "
        f"(recipe {e['recipe']}, seed {shipped['seed']} of {acc['n']}; docs/models.md)"
    )


def entrypoint(name: str) -> Callable[..., nn.Module]:
    """The hub function of network ``name``: ``create_model(name, pretrained=..., normalize=..., **kwargs)``."""

    def build(pretrained: bool = False, normalize: bool = True, **kwargs: Any) -> nn.Module:
        return create_model(name, pretrained=pretrained, normalize=normalize, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"{name} ({model_info(name).family}): {model_info(name).source}.\n\n"
        "Args:\n"
        f"    pretrained: load the shipped weights, checked by sha256: {_weights_doc(name)}.\n"
        "    normalize: with pretrained, the model takes RGB in [0, 1] (B, 3, 32, 32), as\n"
        "        torchvision.transforms.ToTensor() gives it, and normalises inside; False: the bare network.\n"
        "    **kwargs: the builder's arguments (num_classes, ...).\n"
    )
    return build


def entrypoints() -> dict[str, Callable[..., nn.Module]]:
    """One hub function per registered network, by name."""
    return {name: entrypoint(name) for name in list_models()}
