"""Where Numba keeps the compiled kernels: the user's cache, never beside the installed package.

With ``cache=True`` Numba writes each compiled kernel next to its source by default, in a
``__pycache__`` folder inside the package. Inside an installed wheel that folder outlives an
uninstall, and the empty ``kernels_cpu`` folder it leaves behind then shadows a later
editable install (Python imports it as an empty namespace package). So unless
``NUMBA_CACHE_DIR`` says otherwise, the kernels are cached under ``$NANOSERVE_CACHE/numba``
(default ``~/.cache/nanoserve/numba``), where nanoserve keeps its downloaded model too.
Imported first by ``kernels_cpu/__init__.py``, before any kernel is compiled.
"""

import os

import numba


def cache_dir() -> str:
    root = os.environ.get("NANOSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanoserve")
    return os.path.join(root, "numba")


if not os.environ.get("NUMBA_CACHE_DIR"):
    numba.config.CACHE_DIR = cache_dir()
