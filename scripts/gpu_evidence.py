#!/usr/bin/env python
"""Everything the project still owes a GPU, in order of priority, within a time budget.

Examples:
    python scripts/gpu_evidence.py --data-dir $DATA --output-dir $OUT --budget 480
    python scripts/gpu_evidence.py --data-dir $DATA --output-dir $OUT --budget 480 --skip-done EARLIER
    python scripts/gpu_evidence.py --quick --data-dir x --output-dir gpu-quick --budget 600   # CPU, tiny data
"""

import sys
from pathlib import Path

from cifar_lightning.tools.gpu_evidence import main

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    main(["--configs", str(REPO / "configs"), *sys.argv[1:]])
