"""torch.hub entry points: one per registered network, built as ``create_model`` builds it.

    import torch
    model = torch.hub.load("path/to/a/clone", "resnet20", source="local", pretrained=True)
    torch.hub.list("path/to/a/clone", source="local")      # every network
    print(torch.hub.help("path/to/a/clone", "resnet20", source="local"))

``pretrained=True`` loads a network's shipped weights (``cifar_lightning/weights/``, checked against
their sha256); the model then takes images as ``torchvision.transforms.ToTensor()`` gives them, RGB
in [0, 1], and normalises them itself (``normalize=False``: the bare network). docs/weights.md says more.
"""

dependencies = ["torch", "torchvision", "lightning", "torchmetrics", "numpy", "PIL"]

from cifar_lightning.models.hub import entrypoints as _entrypoints  # noqa: E402

globals().update(_entrypoints())
