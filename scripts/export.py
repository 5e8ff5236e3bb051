#!/usr/bin/env python
"""Export a checkpoint and verify it: ``python scripts/export.py CKPT --format onnx --data-dir data``.

CKPT is a checkpoint file, or the name of a network with trained weights (``resnet20``).

The exported model takes raw RGB in [0, 1] (B, 3, 32, 32); exit code 1 when it differs from PyTorch.
"""

import sys

from cifar_lightning.export import export_main

if __name__ == "__main__":
    sys.exit(export_main())
