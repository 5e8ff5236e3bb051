#!/usr/bin/env python
"""Run recipes over seeds and write benchmarks/reproduce.md.

Example: python scripts/reproduce.py mynet_tutorial --seeds 0 1 2 --data-dir ../shared/data/cifar10-jpeg.tar.gz
"""

import sys
from pathlib import Path

# The harnesses run from the clone (benchmarks/ is not installed with the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reproduce import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
