#!/usr/bin/env python
"""Tune a recipe with Optuna: ``python scripts/sweep.py configs/sweeps/resnet20.yaml --data-dir DATA``.

Start it N times with the same ``--storage`` for N workers on one study; ``--help`` lists the options.
"""

from cifar_lightning.sweep import main

if __name__ == "__main__":
    main()
