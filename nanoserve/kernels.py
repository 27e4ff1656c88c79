"""The backend registry: where the model gets its kernels and its array module.

A *backend* is any module or namespace that defines some of the kernel names listed in
``kernels_ref.KERNEL_NAMES`` with the reference signatures, and optionally:

    xp          the array module its kernels take and return (numpy by default; cupy
                for a GPU backend)
    to_device   host numpy array -> backend array          (default: xp.asarray)
    to_host     backend array -> host numpy array           (default: numpy.asarray)

``get_backend(name)`` returns a :class:`Backend` whose ``kernels`` namespace has *every*
contract name: kernels the backend does not define are taken from the reference, and
the backend's ``fallbacks`` lists them (the CLI and engine print that list, so a
fallback is never silent).

    >>> register_backend("mine", my_module)       # or a path: get_backend("lab/mine.py")
    >>> be = get_backend("mine"); be.kernels.rms_norm(x, w, 1e-5)
"""

from __future__ import annotations

import importlib
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import kernels_ref
from nanoserve.errors import BackendError
from nanoserve.pyfile import load_file


@dataclass(frozen=True)
class Backend:
    """A resolved backend: every contract kernel, plus how to move arrays in and out."""

    name: str
    kernels: types.SimpleNamespace  # one attribute per name in kernels_ref.KERNEL_NAMES
    xp: Any  # numpy or a numpy-compatible module (cupy)
    fallbacks: tuple[str, ...]  # kernels taken from the reference
    to_device: Callable[[np.ndarray], Any]
    to_host: Callable[[Any], np.ndarray]


# name -> module, namespace, or a zero-argument factory returning one (imported lazily)
_REGISTRY: dict[str, Any] = {
    "ref": kernels_ref,
    "cpu": lambda: importlib.import_module("kernels_cpu"),
    "cuda": lambda: importlib.import_module("kernels_cuda"),
}


def register_backend(name: str, module_or_namespace: Any) -> None:
    """Make ``get_backend(name)`` resolve to ``module_or_namespace`` (or a factory of it)."""
    if not name or not isinstance(name, str):
        raise BackendError(f"backend name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = module_or_namespace


def available_backends() -> list[str]:
    """Names registered so far (a path to a .py file also works with get_backend)."""
    return sorted(_REGISTRY)


def _load_file(path: str) -> types.ModuleType:
    module = load_file(path, "nanoserve_backend")
    if module is None:
        raise BackendError(f"cannot load a backend from {path!r}: not a Python file")
    return module


def _resolve(name: str) -> Any:
    if name in _REGISTRY:
        entry = _REGISTRY[name]
        if callable(entry) and not isinstance(entry, types.ModuleType):
            try:
                entry = entry()
            except ImportError as exc:
                raise BackendError(
                    f"backend {name!r} cannot be imported ({exc}); install its extra, "
                    "e.g. pip install 'nanoserve[cuda]'"
                ) from exc
            _REGISTRY[name] = entry
        return entry
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise BackendError(f"backend file {name!r} does not exist")
        return _load_file(name)
    raise BackendError(
        f"unknown backend {name!r}; registered: {', '.join(available_backends())} "
        "(or pass the path of a .py file that defines kernels)"
    )


def get_backend(name: str = "ref") -> Backend:
    """Resolve a backend by registered name or .py path; missing kernels fall back to ref."""
    source = _resolve(name)
    implemented: dict[str, Callable] = {}
    fallbacks: list[str] = []
    for kernel in kernels_ref.KERNEL_NAMES:
        fn = getattr(source, kernel, None)
        if callable(fn):
            implemented[kernel] = fn
        else:
            implemented[kernel] = getattr(kernels_ref, kernel)
            fallbacks.append(kernel)
    if len(fallbacks) == len(kernels_ref.KERNEL_NAMES) and source is not kernels_ref:
        if isinstance(source, types.ModuleType) and getattr(source, "__file__", None) is None:
            where = ", ".join(getattr(source, "__path__", [])) or "?"
            raise BackendError(
                f"backend {name!r} imported an empty folder, not nanoserve's package: {where} "
                "(left behind by an uninstalled copy?); delete that folder, or reinstall nanoserve"
            )
        raise BackendError(f"backend {name!r} defines none of the kernels {kernels_ref.KERNEL_NAMES}")
    xp = getattr(source, "xp", np)
    to_device = getattr(source, "to_device", None) or xp.asarray
    to_host = getattr(source, "to_host", None) or np.asarray
    return Backend(
        name=name,
        kernels=types.SimpleNamespace(**implemented),
        xp=xp,
        fallbacks=tuple(fallbacks),
        to_device=to_device,
        to_host=to_host,
    )
