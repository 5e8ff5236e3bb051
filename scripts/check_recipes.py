#!/usr/bin/env python
"""Smoke-check recipes on real images: a few steps each, which must bring the loss below chance.

    python scripts/check_recipes.py --data-dir ../shared/data/cifar10-jpeg.tar.gz        # every recipe
    python scripts/check_recipes.py mynet_tutorial fastnet --data-dir DATA --steps 80     # some, longer

Prints each recipe's figures next to its thresholds and writes benchmarks/recipe_smoke.json and .md.
"""

import sys
from pathlib import Path

# The harnesses run from the clone (benchmarks/ is not installed with the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recipe_check import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
