#!/usr/bin/env python
"""Run recipes over seeds and write benchmarks/reproduce.md.

Example: python scripts/reproduce.py configs/simple_cnn_tutorial.yaml --seeds 0 1 2 \
             --data-dir ../shared/data/cifar10-jpeg.tar.gz
"""

from cifar_lightning.reproduce import main

if __name__ == "__main__":
    main()
