"""Loading a ``.py`` file as a module: how a lab's kernels or engine parts plug in by path.

Both registries (kernel backends in :mod:`nanoserve.kernels`, engine parts in
:mod:`nanoserve.components`) accept a path wherever they accept a registered name.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types


def load_file(path: str, prefix: str) -> types.ModuleType | None:
    """Execute ``path`` as the module ``{prefix}_{file stem}``; None if it is not Python source."""
    module_name = f"{prefix}_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
