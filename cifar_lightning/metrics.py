"""The evaluation metrics a ``ClassifierModule`` keeps: one torchmetrics object per stage and figure."""

from __future__ import annotations

from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

EVAL_STAGES = ("val", "test")


def evaluation_metrics(num_classes: int, superclasses: int = 0) -> tuple[nn.ModuleDict, ...]:
    """(loss, accuracy, per-class accuracy, top-5, superclass accuracy) ModuleDicts keyed ``val_``
    and ``test_``; top-5 only above 10 classes, superclass accuracy only with ``superclasses`` groups.

    One object per stage: a shared MetricCollection would mix states between stages. The keys get a
    suffix because "train" is already an ``nn.Module`` attribute. Input checks are off: each one
    (MeanMetric's NaN filter, the accuracy's label-range check) reads a tensor back from the GPU,
    which stalls a fast loop. Labels are checked when the data is read, and a NaN loss shows up in
    the logged mean instead of being dropped.
    """

    def per_stage(make) -> nn.ModuleDict:
        return nn.ModuleDict({f"{s}_": make() for s in EVAL_STAGES})

    def accuracy(classes: int, **kwargs) -> MulticlassAccuracy:
        return MulticlassAccuracy(classes, validate_args=False, **kwargs)

    return (
        per_stage(lambda: MeanMetric(nan_strategy="disable")),
        per_stage(lambda: accuracy(num_classes, average="micro")),
        per_stage(lambda: accuracy(num_classes, average=None)),
        # Top-5 is the second figure every CIFAR-100 table quotes; with 10 classes or fewer it says little.
        per_stage(lambda: accuracy(num_classes, top_k=5, average="micro")) if num_classes > 10 else nn.ModuleDict(),
        per_stage(lambda: accuracy(superclasses, average="micro")) if superclasses else nn.ModuleDict(),
    )
