"""The notebooks are lessons that must keep running: execute each one headless and fail on any cell error.

Each notebook runs in a fresh ``python3`` kernel with ``notebooks/`` as its working directory
(the notebooks put the repository root on ``sys.path`` themselves) and the Agg matplotlib
backend. The executed copy is discarded; the file on disk is never rewritten.
"""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def execute_notebook(name: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run every cell of ``notebooks/<name>``; return ``"cell N: ename: evalue"`` for each error output."""
    monkeypatch.setenv("MPLBACKEND", "Agg")  # inherited by the kernel process
    nb = nbformat.read(os.path.join(NOTEBOOKS_DIR, name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS_DIR}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{name} failed:\n{exc}")
    return [
        f"cell {i}: {out.get('ename')}: {out.get('evalue')}"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]


@pytest.mark.real_model
def test_notebook_01_prompt_to_next_token_runs_without_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert execute_notebook("01_prompt_to_next_token.ipynb", monkeypatch) == []


def test_notebook_03_continuous_batching_runs_without_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert execute_notebook("03_continuous_batching.ipynb", monkeypatch) == []


def test_notebook_05_prefix_cache_runs_without_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert execute_notebook("05_prefix_cache.ipynb", monkeypatch) == []


@pytest.mark.real_model
def test_notebook_06_speculative_decoding_runs_without_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert execute_notebook("06_speculative_decoding.ipynb", monkeypatch) == []


@pytest.mark.real_model
@pytest.mark.slow
def test_notebook_07_quantization_runs_without_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert execute_notebook("07_quantization.ipynb", monkeypatch) == []


@pytest.mark.real_model
def test_notebook_08_structured_output_runs_without_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert execute_notebook("08_structured_output.ipynb", monkeypatch) == []
