#!/usr/bin/env python
"""Benchmarks of the fast path: data, Lightning overhead, time to accuracy, memory.

Examples:
    python scripts/bench.py --data-dir ../shared/data/cifar10-jpeg.tar.gz --output benchmarks/cpu.json
    python scripts/bench.py --sections time_to_accuracy --seeds 0 1 --data-dir DATA --output benchmarks/time_to_accuracy_cpu.json
    python scripts/bench.py --merge benchmarks/time_to_accuracy_cpu/seed*.json --output benchmarks/time_to_accuracy_cpu.json
    python scripts/bench.py --quick                                      # seconds, tiny synthetic data
"""

import sys
from pathlib import Path

# The harnesses run from the clone (benchmarks/ is not installed with the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
