"""The tutorial notebook runs from top to bottom on demo data."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "tutorial.ipynb"


@pytest.mark.slow
def test_tutorial_notebook_executes(tmp_path):
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "log2p1 matches numpy: True" in outputs
    assert "genes have under 50% zeros" in outputs
    assert (tmp_path / "tutorial.loom").exists() and (tmp_path / "tutorial-umap.png").exists()
