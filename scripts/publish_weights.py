#!/usr/bin/env python
"""Ship trained weights: the median seed of each recipe's kept runs, into cifar_lightning/weights/.

    python scripts/reproduce.py resnet20_short --seeds 0 1 2 --data-dir DATA --keep-checkpoints
    python scripts/publish_weights.py resnet20_short --data-dir DATA

Names the file by its sha256, writes its manifest entry (accuracy over the seeds and of the shipped
file, recipe, commit, data, machine), removes the files it supersedes and writes docs/models.md again.
"""

import sys
from pathlib import Path

# The harnesses run from the clone (benchmarks/ is not installed with the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.publish_weights import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
