#!/usr/bin/env python
"""Benchmarks of the fast path: data, Lightning overhead, time to accuracy, memory.

Examples:
    python scripts/bench.py --data-dir ../shared/data/cifar10-jpeg.tar.gz --output benchmarks/cpu.json
    python scripts/bench.py --sections tta --seeds 0 1 2 --data-dir DATA --output benchmarks/fastnet_cpu.json
    python scripts/bench.py --quick                                      # seconds, tiny synthetic data
"""

import sys
from pathlib import Path

from cifar_lightning.tools.bench import main

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    main(["--config", str(REPO / "configs" / "fastnet_muon.yaml"), *sys.argv[1:]])
