#!/usr/bin/env python
"""Install the lowest versions setup.cfg allows (uv's lowest-direct resolution) and run the default tests.

    pip install uv && python scripts/check_lowest_versions.py --venv ../venv-lowest

Writes benchmarks/lowest_versions.json: each direct dependency's range and installed version,
the test counts and time, and the provenance. The environment's folder must be new and outside
the clone; the install's and the tests' output go to a .log beside it.
"""

import sys
from pathlib import Path

# The harnesses run from the clone (benchmarks/ is not installed with the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lowest_versions import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
