"""notebooks/explore_predictions.ipynb runs end to end against a tiny checkpoint, and is committed clean."""

from __future__ import annotations

import nbformat
from conftest import REPO
from nbclient import NotebookClient
from test_evaluate import trained_run

NOTEBOOK = REPO / "notebooks" / "explore_predictions.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def test_notebook_runs_against_a_tiny_checkpoint(tmp_path_factory, monkeypatch):
    ckpt, data = trained_run(tmp_path_factory)
    # The kernel inherits this environment: the first cell reads its parameters from it.
    monkeypatch.setenv("CKPT", str(ckpt))
    monkeypatch.setenv("DATA_DIR", str(data))
    monkeypatch.delenv("MY_IMAGE", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # grid, per-class accuracy, confusion matrix, mistakes, reliability, corruptions, corrupted examples, own image
    assert len(images) >= 8
    text = "".join(o.get("text", "") for o in outputs)
    assert "simple_cnn: " in text and "% of 24 test images right" in text
    assert "<->" in text  # the most confused pairs
    assert "ECE" in text and "fitted on the validation split (6 images)" in text
    assert "mean under corruption" in text
