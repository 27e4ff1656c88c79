"""What an installed nanoserve leaves on disk, and the error when an install is broken."""

from __future__ import annotations

import glob
import importlib
import os
import sys

import numba
import numpy as np
import pytest

import kernels_cpu
from kernels_cpu import compile_cache
from nanoserve.errors import BackendError
from nanoserve.kernels import get_backend, register_backend


def test_compiled_kernels_are_cached_outside_the_package():
    if os.environ.get("NUMBA_CACHE_DIR"):
        pytest.skip("NUMBA_CACHE_DIR is set: Numba caches where it says")
    assert numba.config.CACHE_DIR == compile_cache.cache_dir()
    kernels = get_backend("cpu").kernels
    kernels.rms_norm(np.ones((2, 8), np.float32), np.ones(8, np.float32), 1e-5)  # compiled or loaded from the cache
    package = os.path.dirname(kernels_cpu.__file__)
    assert not glob.glob(os.path.join(package, "__pycache__", "*.nb[ic]")), "compiled kernels beside the package"
    assert glob.glob(os.path.join(compile_cache.cache_dir(), "**", "pointwise.*.nbi"), recursive=True)


def test_a_backend_that_imports_an_empty_leftover_folder_says_so(tmp_path, monkeypatch):
    shell = tmp_path / "kernels_leftover" / "__pycache__"
    shell.mkdir(parents=True)  # what an uninstalled wheel used to leave: no __init__.py, only a cache
    monkeypatch.syspath_prepend(str(tmp_path))
    register_backend("leftover", lambda: importlib.import_module("kernels_leftover"))
    try:
        with pytest.raises(BackendError, match=r"imported an empty folder, not nanoserve's package: .*kernels_leftover"):
            get_backend("leftover")
    finally:
        sys.modules.pop("kernels_leftover", None)


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_the_dev_extra_pulls_no_cuda_toolkit_wheels_and_the_cuda_extras_do():
    extras = _pyproject()["optional-dependencies"]
    toolkit = "numba-cuda[cu12]"  # numba-cuda's extra that brings NVIDIA's toolkit wheels (~430 MB)
    assert not any(req.startswith(toolkit) or req.startswith("nvidia-") for req in extras["dev"]), extras["dev"]
    assert any(req.startswith("numba-cuda>=") for req in extras["dev"])  # the CUDA simulator needs numba-cuda alone
    assert any(req.startswith(toolkit) for req in extras["cuda"]) and any(req.startswith(toolkit) for req in extras["ptx"])


def test_the_notebooks_extra_installs_jupyter_and_what_the_notebooks_import():
    notebooks = {req.split(">")[0].split("=")[0] for req in _pyproject()["optional-dependencies"]["notebooks"]}
    assert {"jupyterlab", "ipykernel", "matplotlib", "httpx", "openai"} <= notebooks


def test_threadpoolctl_is_a_dependency_since_every_command_sets_blas_threads_through_it():
    assert any(req.startswith("threadpoolctl") for req in _pyproject()["dependencies"])
