#!/usr/bin/env python
"""Run a sweep and keep its table, best recipe and plots in benchmarks/sweeps/ with provenance:
``python scripts/record_sweep.py configs/sweeps/resnet20.yaml --quick --data-dir DATA``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives in the clone

from benchmarks.sweep_record import main  # noqa: E402

if __name__ == "__main__":
    main()
