"""Choosing the engine's parts by name: a registry, like the kernel backends' one.

An :class:`~nanoserve.config.EngineConfig` names each part (see :mod:`nanoserve.interfaces`):

    block_allocator = "lru"                       a registered name
    scheduler       = "labs/05/student.py:Scheduler"   a class (or factory) in a .py file
    kv_manager      = "mypackage.kv:MyManager"    a class in an importable module

``build(seam, name, *args)`` resolves the name to a factory, calls it with the arguments
that seam's constructor takes, and checks that the object has every method of the seam's
interface; if not, a :class:`~nanoserve.errors.ComponentError` names what is missing.
Factories are imported only when used.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

from nanoserve.errors import ComponentError
from nanoserve.interfaces import INTERFACES
from nanoserve.pyfile import load_file

# seam -> name -> "module:attribute" (imported lazily) or a factory
_REGISTRY: dict[str, dict[str, str | Callable[..., Any]]] = {
    "block_allocator": {"lru": "nanoserve.cache.block_pool:BlockPool"},
    "prefix_cache": {"radix": "nanoserve.cache.radix:RadixCache", "hash": "nanoserve.cache.hash_cache:HashPrefixCache"},
    "kv_manager": {"paged": "nanoserve.cache.kv_cache_manager:KVCacheManager"},
    "scheduler": {"fcfs": "nanoserve.scheduler:Scheduler", "lpm": "nanoserve.scheduler:LongestPrefixMatchScheduler"},
    "sampler": {"default": "nanoserve.sampling:Sampler"},
    "proposer": {"ngram": "nanoserve.spec.ngram:NgramProposer", "draft": "nanoserve.spec.draft:DraftModelProposer"},
}


def register_component(seam: str, name: str, factory: str | Callable[..., Any]) -> None:
    """Make ``name`` resolve to ``factory`` (a class, a function, or "module:attribute")."""
    _check_seam(seam)
    if not name or not isinstance(name, str):
        raise ComponentError(f"a {seam} name must be a non-empty string, got {name!r}")
    _REGISTRY[seam][name] = factory


def available_components(seam: str) -> list[str]:
    """Names registered for ``seam`` (a FILE.py:NAME or module:NAME also works)."""
    _check_seam(seam)
    return sorted(_REGISTRY[seam])


def resolve(seam: str, name: str) -> Callable[..., Any]:
    """The factory ``name`` stands for: a registered name, ``FILE.py:NAME`` or ``module:NAME``."""
    _check_seam(seam)
    entry = _REGISTRY[seam].get(name, name)
    if callable(entry):
        return entry
    if ":" not in entry:
        raise ComponentError(
            f"unknown {seam} {name!r}; registered: {', '.join(available_components(seam))} "
            "(or give FILE.py:NAME or module:NAME)"
        )
    where, attribute = entry.rsplit(":", 1)
    module = _load_file(seam, where) if where.endswith(".py") else _import(seam, where)
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ComponentError(f"{seam} {name!r}: {where} defines no class or function {attribute!r}")
    return factory


def build(seam: str, name: str, *args: Any) -> Any:
    """Construct the ``seam`` part called ``name`` with ``args`` and check its interface."""
    factory = resolve(seam, name)
    try:
        part = factory(*args)
    except TypeError as exc:
        raise ComponentError(f"{seam} {name!r} could not be constructed: {exc}") from exc
    require(part, seam, name)
    return part


def require(part: Any, seam: str, name: str | None = None) -> None:
    """Raise ComponentError unless ``part`` has every member of the seam's interface."""
    _check_seam(seam)
    interface = INTERFACES[seam]
    missing = [member for member in interface_members(interface) if not hasattr(part, member)]
    if missing:
        label = f"{seam} {name!r}" if name else f"this {seam}"
        raise ComponentError(
            f"{label} ({type(part).__name__}) does not implement {interface.__name__}: "
            f"missing {', '.join(missing)}"
        )


def interface_members(interface: type) -> list[str]:
    """The public methods, properties and attributes a Protocol declares, in order."""
    names = [n for n, v in vars(interface).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))]
    return list(getattr(interface, "__annotations__", {})) + names


def _check_seam(seam: str) -> None:
    if seam not in _REGISTRY:
        raise ComponentError(f"unknown seam {seam!r}; the engine's seams are {', '.join(_REGISTRY)}")


def _import(seam: str, module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ComponentError(f"cannot import the {seam} module {module_name!r}: {exc}") from exc


def _load_file(seam: str, path: str) -> Any:
    if not os.path.isfile(path):
        raise ComponentError(f"{seam} file {path!r} does not exist")
    module = load_file(path, f"nanoserve_{seam}")
    if module is None:
        raise ComponentError(f"cannot load a {seam} from {path!r}: not a Python file")
    return module
