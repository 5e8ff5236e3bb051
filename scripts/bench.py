#!/usr/bin/env python
"""Benchmarks of the fast path: data, Lightning overhead, time to accuracy, memory.

Examples:
    python scripts/bench.py --output benchmarks/cpu.json                 # data, overhead, memory
    python scripts/bench.py --sections tta --seeds 0 1 2 --output benchmarks/fastnet_cpu.json
    python scripts/bench.py --quick                                      # seconds, tiny synthetic data
"""

from cifar_lightning.bench import main

if __name__ == "__main__":
    main()
