#!/usr/bin/env python
"""Everything the project still owes a GPU, in order of priority, within a time budget.

Examples:
    python scripts/gpu_evidence.py --data-dir $DATA --output-dir $OUT --budget 480
    python scripts/gpu_evidence.py --data-dir $DATA --output-dir $OUT --budget 480 --skip-done EARLIER
    python scripts/gpu_evidence.py --quick --data-dir x --output-dir gpu-quick --budget 600   # CPU, tiny data
"""

import sys
from pathlib import Path

# The harnesses run from the clone (benchmarks/ is not installed with the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_evidence import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
