#!/usr/bin/env python
"""Top-k classes of images: ``python scripts/predict.py CKPT cat.jpg photos/ 'shots/*.png' https://...``.

CKPT is a checkpoint file, or the name of a network with trained weights (``resnet20``; docs/weights.md).

Exit code 1 when any input could not be read (each gets one ``error:`` line); ``--help`` lists the options.
"""

import sys

from cifar_lightning.predict import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
