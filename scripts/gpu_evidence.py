#!/usr/bin/env python
"""Everything the project still owes a GPU, in order of priority, within a time budget.

Examples:
    python scripts/gpu_evidence.py --data-dir $DATA --output-dir $OUT   # the default plan, in 420 s
    python scripts/gpu_evidence.py --data-dir $DATA --output-dir $OUT2 --sections resnet18_fast,recipes \
        --budget 480 --skip-done EARLIER
    python scripts/gpu_evidence.py --quick --data-dir x --output-dir gpu-quick   # on the CPU, tiny data
"""

import sys
from pathlib import Path

# The harnesses run from the clone (benchmarks/ is not installed with the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_evidence import main  # noqa: E402
from cifar_lightning.errors import exit_on_user_error  # noqa: E402

if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
