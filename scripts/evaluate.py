#!/usr/bin/env python
"""Evaluate a checkpoint on the test split: ``python scripts/evaluate.py CKPT [--tta]``.

CKPT is a checkpoint file, or the name of a network with trained weights (``resnet20 --data-dir DATA``).

Writes report.json, confusion_matrix.png, confused_pairs.png, per_class_accuracy.png,
predictions_grid.png and mistakes.png into ``<run dir>/eval/<checkpoint name>/`` (or
``--output-dir``); ``--help`` lists the rest.
"""

from cifar_lightning.evaluation import evaluate_main

if __name__ == "__main__":
    evaluate_main()
