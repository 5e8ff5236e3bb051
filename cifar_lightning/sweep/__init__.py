"""Hyperparameter sweeps with Optuna: ``scripts/sweep.py SWEEP.yaml``.

- ``spec``: the sweep file (base recipe, metric, search space, sampler, pruner), checked;
- ``runner``: a worker of a study (ask, train, tell), its storage, and the command line;
- ``trial``: one trial, in its own process: a ``scripts/fit.py`` run with pruning, no test;
- ``results``: the table of trials, the best configuration as a recipe, the plots, the one test.
"""

from cifar_lightning.sweep.runner import main
from cifar_lightning.sweep.spec import SweepSpec, load_sweep

__all__ = ["SweepSpec", "load_sweep", "main"]
