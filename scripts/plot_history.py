#!/usr/bin/env python
"""Plot loss, accuracy and learning rate per epoch: ``python scripts/plot_history.py runs/resnet18/version_0``."""

from cifar_lightning.plots import plot_history_main

if __name__ == "__main__":
    plot_history_main()
