#!/usr/bin/env python
"""Train, test and report in one command: ``python scripts/fit.py --arch resnet18 --devices 2``.

The short flags are aliases of ``python -m cifar_lightning fit`` arguments; ``--help`` lists them.
"""

from cifar_lightning.fit import fit_main

if __name__ == "__main__":
    fit_main()
