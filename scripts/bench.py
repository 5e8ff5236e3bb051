#!/usr/bin/env python
"""Benchmarks of the fast path: data, Lightning overhead, time to accuracy, memory.

Examples:
    python scripts/bench.py --data-dir ../shared/data/cifar10-jpeg.tar.gz --output benchmarks/cpu.json
    python scripts/bench.py --sections tta --seeds 0 1 --data-dir DATA --output benchmarks/time_to_accuracy_cpu.json
    python scripts/bench.py --quick                                      # seconds, tiny synthetic data
"""

import sys
from cifar_lightning.tools.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
