"""Notebook 04 (serving) is a lesson that must keep running: execute it headless.

It starts the HTTP server over SmolLM2-135M-Instruct on a free loopback port, calls it with
the openai client, and plots latency under a small load. It runs in a fresh ``python3``
kernel with ``notebooks/`` as its working directory and the Agg matplotlib backend; the
executed copy is discarded.
"""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.real_model
def test_notebook_04_serving_runs_without_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")  # inherited by the kernel process
    nb = nbformat.read(os.path.join(NOTEBOOKS_DIR, "04_serving.ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS_DIR}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"04_serving.ipynb failed:\n{exc}")
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert [out for out in outputs if out.output_type == "error"] == []
    assert any("image/png" in out.get("data", {}) for out in outputs)  # the latency figure
    text = "".join(out.get("text", "") for out in outputs)
    assert "after the client left: blocks in use = 0" in text
