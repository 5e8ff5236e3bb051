"""The harnesses that measure and check the package, beside the results they write.

They are not installed: they run from a clone, through the thin commands in ``scripts/``
(``bench.py``, ``gpu_evidence.py``, ``check_recipes.py``, ``reproduce.py``), and they read the
repository's recipes and results. Everything a user imports is in ``cifar_lightning``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The clone these harnesses belong to.
REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a harness's own child process (``python -m benchmarks....``): this one,
    with the clone first on the import path, whatever the child's working folder."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
