"""Checks every lab shares: signatures against the reference, forbidden imports, engine runs.

``check_signatures`` compares the parameter names of the student's functions (or a class's
methods and properties) with the reference's. ``check_imports`` reads the file's imports
(its syntax tree, so nothing runs) and refuses the module, or the names, the lab replaces.
``run_engine`` serves a fixed greedy workload on the real engine and returns the tokens
and the counters the ``counters`` criterion compares.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanoserve.labs.grader import CriterionFailed, Submission
from nanoserve.pyfile import load_file


def load_module(submission: Submission, prefix: str) -> Any:
    """Execute the student's file once; the module is kept on the submission."""
    if submission.module is None:
        try:
            module = load_file(submission.path, prefix)
        except Exception as exc:
            raise CriterionFailed(f"{submission.path} does not load: {type(exc).__name__}: {exc}", "run `python FILE` to see the whole error") from exc
        if module is None:
            raise CriterionFailed(f"{submission.path} is not a Python file")
        submission.module = module
    return submission.module


MISSING = object()  # an attribute the student's class lacks (None is a value a class may hold)


def parameters(fn: Any) -> list[str]:
    """Parameter names of ``fn``, without ``self``."""
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def check_signatures(module: Any, reference: dict[str, Any]) -> str:
    """Each name in ``reference`` exists in ``module`` with the same parameters.

    ``reference`` maps a name to a function, or to a class whose public methods and
    properties the student's class of that name must have too.
    """
    problems: list[str] = []
    checked = 0
    for name, ref in reference.items():
        got = getattr(module, name, None)
        if got is None:
            problems.append(f"{name} is missing")
            continue
        if inspect.isclass(ref):
            if not inspect.isclass(got):
                problems.append(f"{name} must be a class")
                continue
            members = [m for m in vars(ref) if not m.startswith("_") or m == "__init__"]
            for member in members:
                want, have = vars(ref)[member], inspect.getattr_static(got, member, MISSING)
                checked += 1
                if have is MISSING:
                    problems.append(f"{name}.{member} is missing")
                elif isinstance(want, property) != isinstance(have, property):
                    problems.append(f"{name}.{member} must {'' if isinstance(want, property) else 'not '}be a property")
                elif callable(want) and callable(have) and parameters(want) != parameters(have):
                    problems.append(f"{name}.{member}({', '.join(parameters(have))}) should take ({', '.join(parameters(want))})")
        else:
            checked += 1
            if not callable(got):
                problems.append(f"{name} must be a function")
            elif parameters(got) != parameters(ref):
                problems.append(f"{name}({', '.join(parameters(got))}) should take ({', '.join(parameters(ref))})")
    if problems:
        raise CriterionFailed("; ".join(problems), "keep the stub's signatures: the engine calls them by these names")
    return f"{checked} signatures match the reference"


def imported_names(path: str) -> list[tuple[str, str | None]]:
    """Every ``(module, name)`` the file imports; ``name`` is None for ``import module``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
            found += [(f"{node.module}.{alias.name}", None) for alias in node.names]  # from pkg import module
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("__import__", "import_module"):
            found += [(arg.value, None) for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    return found


def check_imports(path: str, forbidden_modules: tuple[str, ...], forbidden_names: dict[str, set[str]]) -> str:
    """The file imports none of ``forbidden_modules`` (or their submodules), and none of the
    names ``forbidden_names[module]`` from those modules; other names from them are allowed."""
    bad: list[str] = []
    for module, name in imported_names(path):
        if any(module == m or module.startswith(m + ".") for m in forbidden_modules):
            bad.append(module if name is None else f"{module}.{name}")
        elif name is None and module in forbidden_names:
            bad.append(module)
        elif name is not None and name in forbidden_names.get(module, set()):
            bad.append(f"{module}.{name}")
    if bad:
        raise CriterionFailed(f"imports {', '.join(sorted(set(bad)))}, the piece this lab asks you to write", "write it yourself; NumPy and the standard library are fine")
    return "imports nothing it replaces"


@dataclass
class EngineRun:
    """What one run of the workload produced: tokens per request, and the counters."""

    tokens: list[list[int]]
    peak_used_blocks: int
    num_preemptions: int
    num_steps: int
    block_size: int
    contiguous_slots: int  # what a contiguous cache reserves: max_model_len for each request it can run at once


def workload(vocab_size: int, seed: int = 0, num_requests: int = 6) -> list[list[int]]:
    """Prompts of mixed lengths, two of them sharing a prefix (a prefix cache finds it)."""
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(3, vocab_size, size=int(rng.integers(2, 24)))] for _ in range(num_requests)]
    prompts.append(prompts[0] + [int(t) for t in rng.integers(3, vocab_size, size=5)])
    return prompts


def run_engine(loaded: Any, max_tokens: int = 8, **engine_kwargs: Any) -> EngineRun:
    """Serve :func:`workload` greedily on ``LLMEngine(loaded=loaded, **engine_kwargs)``,
    checking every part's invariants after each step."""
    from nanoserve.engine import LLMEngine
    from nanoserve.sampling import SamplingParams

    engine_kwargs.setdefault("num_blocks", 64)
    engine_kwargs.setdefault("block_size", 4)
    engine = LLMEngine(loaded=loaded, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in workload(loaded.config.vocab_size)]
    final: dict[str, list[int]] = {}
    peak = 0
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished and out.finish_reason == "error":
                error = str(out.error)
                if "NotImplementedError" in error and "Lab " in error:
                    raise NotImplementedError(error[error.index("Lab "):])
                raise CriterionFailed(f"a request failed inside the engine: {error}")
            if out.finished:
                final[out.request_id] = list(out.token_ids)
        engine.check_invariants()
        peak = max(peak, engine.stats().num_used_blocks)
    if engine.has_unfinished_requests():
        raise CriterionFailed("the engine did not finish the workload in 10,000 steps", "a request never got the blocks it needed")
    stats = engine.stats()
    contiguous = engine.max_model_len * min(engine.scheduler.max_num_seqs, len(ids))
    return EngineRun([final[i] for i in ids], peak, stats.num_preemptions, stats.num_steps, stats.block_size, contiguous)


def compare_tokens(got: EngineRun, want: EngineRun) -> str:
    """Raise unless every request's greedy tokens equal the reference engine's."""
    for i, (g, w) in enumerate(zip(got.tokens, want.tokens, strict=True)):
        if g != w:
            at = next((j for j, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), min(len(g), len(w)))
            raise CriterionFailed(f"request {i}: token {at} is {g[at] if at < len(g) else 'missing'}, the reference engine's is {w[at] if at < len(w) else 'none'}")
    return f"{len(got.tokens)} requests, {sum(map(len, got.tokens))} greedy tokens equal the reference engine's"
