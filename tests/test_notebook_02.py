"""Notebook 02 (paged attention) is a lesson that must keep running: execute it headless.

It runs in a fresh ``python3`` kernel with ``notebooks/`` as its working directory and the
Agg matplotlib backend; the executed copy is discarded. It needs no model download and
finishes in seconds (its last section runs kernels_cuda on the CUDA simulator).
"""

from __future__ import annotations

import os
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def test_notebook_02_paged_attention_runs_without_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")  # inherited by the kernel process
    nb = nbformat.read(os.path.join(NOTEBOOKS_DIR, "02_paged_attention.ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS_DIR}}
    )
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"02_paged_attention.ipynb failed:\n{exc}")
    assert time.perf_counter() - start < 60
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 2  # the block-table figure and the online-softmax figure
