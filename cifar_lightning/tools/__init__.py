"""Tools around the package, each behind a thin script in ``scripts/``: benchmarks (``bench``,
``bench_memory``, ``gpu_evidence``), reproductions (``reproduce``, ``recipe_check``) and the model
card (``model_card``). Repository paths (configs, results, data) are their arguments, never
constants, so they work from an installed package too."""
