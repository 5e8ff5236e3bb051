#!/usr/bin/env python
"""Run recipes over seeds and write benchmarks/reproduce.md.

Example: python scripts/reproduce.py mynet_tutorial --seeds 0 1 2 --data-dir ../shared/data/cifar10-jpeg.tar.gz
"""

import sys
from pathlib import Path

from cifar_lightning.tools.reproduce import main

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    # This checkout's folders, unless the command line names others (later flags win).
    defaults = ["--configs", str(REPO / "configs"), "--results", str(REPO / "benchmarks" / "reproduce"),
                "--table", str(REPO / "benchmarks" / "reproduce.md"),
                "--smoke", str(REPO / "benchmarks" / "recipe_smoke.json")]  # fmt: skip
    main([*defaults, *sys.argv[1:]])
