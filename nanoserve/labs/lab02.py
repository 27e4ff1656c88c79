"""Lab 02's grader: causal attention with grouped-query heads over a contiguous KV cache.

The student's file is a kernel backend (:func:`nanoserve.kernels.get_backend` by path): its
``attention`` replaces the reference's, every other kernel falls back to the reference.
``causal_mask`` is the lesson's helper (which keys each query may see), checked on its own.

    property     the kernel suite (nanoserve.check_kernels) on ``attention``: random shapes,
                 GQA ratios, q_len < kv_len (decodes, prefill chunks), float16 keys; then the
                 lesson's fixed cases (2 KV heads x 3 query heads each, a decode, a chunk).
                 A failure prints the shrunk example and, when the output matches a known
                 mistake (KV head h % Hkv, a mask shifted by one), names it
    invariants   one key returns its value (from KV head h // (H // Hkv)); the attention
                 weights (read out through one-hot values) are >= 0, rows sum to 1, zero
                 on future keys; changing a future key changes nothing; ``causal_mask`` is
                 right; float32 output of q's shape; inputs untouched
    integration  (a) one sequence generated greedily through ``ContiguousKVCache`` on the
                 student's backend; (b) the real engine, whose paged cache reaches the
                 student's attention through :func:`paged_through` (each sequence's pages
                 gathered, then ``attention``: the reference's own definition of paged
                 attention). Greedy tokens must equal the reference engine's
    speed        a prefill and a long decode against the reference's time
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np

import kernels_ref
from kernels_ref.attention import gather_pages
from nanoserve.labs.common import (
    check_imports,
    check_signatures,
    compare_tokens,
    load_module,
    run_engine,
    workload,
)
from nanoserve.labs.grader import Criterion, CriterionFailed, Lab, Submission

FORBIDDEN = ("kernels_ref", "kernels_cpu", "kernels_cuda", "nanoserve.kernels", "nanoserve.check_kernels")

HINT = "query i sits at position Tk - Tq + i and sees keys 0 .. Tk - Tq + i; query head h reads KV head h // (H // Hkv)"
HINT_GQA = "query head h reads KV head h // (H // Hkv): the H // Hkv heads of one group are neighbours (np.repeat, not np.tile)"
HINT_MASK = "the queries are the LAST Tq positions: query i may see keys j <= Tk - Tq + i (itself included, nothing after)"

# The lesson's own cases, run after the random ones: GQA with both ratios > 1, a decode, a chunk.
_CASE = {"kv_dtype": "float32", "scale": None, "seed": 3}
LESSON_CASES = [
    ("GQA: 2 KV heads, 3 query heads each, a whole prefill", {**_CASE, "num_q": 5, "num_k": 5, "kv_heads": 2, "group": 3, "head_dim": 8}),
    ("a decode: 1 query over 7 keys", {**_CASE, "num_q": 1, "num_k": 7, "kv_heads": 2, "group": 2, "head_dim": 4}),
    ("a prefill chunk: 3 queries over 9 keys", {**_CASE, "num_q": 3, "num_k": 9, "kv_heads": 1, "group": 3, "head_dim": 4}),
]


def causal_mask(num_q: int, num_k: int) -> np.ndarray:  # -> [Tq, Tk] bool
    """True where query i may attend to key j: the queries are the last ``num_q`` of the
    ``num_k`` positions, so query i sits at ``num_k - num_q + i`` and sees ``j <= num_k - num_q + i``."""
    q_pos = np.arange(num_k - num_q, num_k)[:, None]  # [Tq, 1]
    return np.arange(num_k)[None, :] <= q_pos  # [Tq, Tk]


def signatures(sub: Submission) -> str:
    module = load_module(sub, "lab02")
    return check_signatures(module, {"attention": kernels_ref.attention, "causal_mask": causal_mask})


def imports(sub: Submission) -> str:
    detail = check_imports(sub.path, FORBIDDEN, {})
    if getattr(sub.module.attention, "__module__", "").startswith("kernels_"):
        raise CriterionFailed("attention is the reference's own function", "write it yourself")
    return detail


# --- property: the kernel suite, and what a wrong output looks like ---------------------------


def kernel_suite(sub: Submission, backend: Any, kernels: dict[str, str], lesson_cases: dict[str, list[tuple[str, dict]]],
                 diagnose: Callable[[str, dict], str | None] = lambda kernel, params: None) -> str:
    """The kernel suite on each of ``kernels`` (name -> hint), then each one's fixed lesson cases.

    A failure raises CriterionFailed with the shrunk example; ``diagnose(kernel, params)``
    may give a sharper hint than the kernel's own. The stub's NotImplementedError passes
    through, so the report shows the lab's own message.
    """
    from nanoserve.check_kernels import SPECS, check_kernel, run_case

    examples, checked = (20 if sub.quick else 100), 0
    for kernel, hint in kernels.items():
        report = check_kernel(backend, kernel, max_examples=examples, seed=0)
        checked += report.examples
        if not report.passed:
            problem = report.problem or ""
            if "NotImplementedError" in problem and "Lab " in problem:
                raise NotImplementedError(problem.split("NotImplementedError: ", 1)[1])
            raise CriterionFailed(report.describe_failure(), diagnose(kernel, report.failing_example or {}) or hint)
        for label, params in lesson_cases.get(kernel, []):
            outcome = run_case(backend, SPECS[kernel], params)
            checked += 1
            if outcome.problem:
                raise CriterionFailed(f"{kernel} FAILED on {label}: {outcome.problem}\n  example: {params!r}", diagnose(kernel, params) or hint)
    return f"{', '.join(kernels)} agree{'s' if len(kernels) == 1 else ''} with the reference on {checked} examples (edge cases and the lesson's cases included)"


def variant_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, kv_head: Callable[[int, int, int], int], shift: int) -> np.ndarray:  # [Tq, H, D], [Tk, Hkv, D] x2 -> [Tq, H, D]
    """Attention, head by head, with the KV head of query head h given by ``kv_head(h, H, Hkv)``
    and query i seeing keys ``j <= Tk - Tq + i + shift``: the right one (h // g, 0) and its
    usual mistakes. Rows that see no key come out NaN, as a softmax over nothing does."""
    num_q, num_heads, _ = q.shape
    num_k, num_kv_heads, _ = k.shape
    allowed = np.arange(num_k)[None, :] <= np.arange(num_k - num_q, num_k)[:, None] + shift  # [Tq, Tk]
    out = np.zeros(q.shape, np.float64)
    for h in range(num_heads):
        j = kv_head(h, num_heads, num_kv_heads)
        scores = np.where(allowed, (q[:, h].astype(np.float64) @ k[:, j].astype(np.float64).T) * scale, -np.inf)
        with np.errstate(invalid="ignore"):
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[:, h] = (weights / weights.sum(axis=-1, keepdims=True)) @ v[:, j].astype(np.float64)
    return out


def _right(h: int, heads: int, kv_heads: int) -> int:
    return h // (heads // kv_heads)


def _modulo(h: int, heads: int, kv_heads: int) -> int:
    return h % kv_heads


def diagnose_attention(attention: Callable, args: tuple) -> str | None:
    """Name the known mistake the student's output on ``args`` matches, if one does."""
    q, k, v, scale = args
    num_q, num_k = q.shape[0], k.shape[0]
    mistakes = [
        ((_modulo, 0), "query head h read KV head h % Hkv; it must read h // (H // Hkv) (np.repeat, not np.tile)"),
        ((_right, 1), "each query saw one key past its own position: query i may see keys j <= Tk - Tq + i"),
        ((_right, -1), "each query missed its own key: query i may see keys j <= Tk - Tq + i, itself included"),
        ((_right, num_q - num_k), "the mask starts at position 0: the queries are the LAST Tq of the Tk positions"),
        ((_right, num_k), "nothing was masked: a query must not see the keys after its position"),
    ]
    try:
        got = np.asarray(attention(q.copy(), k.copy(), v.copy(), scale), dtype=np.float64)
    except Exception:
        return None
    right = variant_attention(q, k, v, scale, _right, 0)
    for (kv_head, shift), hint in mistakes:
        wrong = variant_attention(q, k, v, scale, kv_head, shift)
        if got.shape == wrong.shape and np.allclose(got, wrong, rtol=1e-4, atol=1e-5, equal_nan=True) and not np.allclose(right, wrong, equal_nan=True):
            return hint
    return None


def property_suite(sub: Submission) -> str:
    from nanoserve.check_kernels import build_case
    from nanoserve.kernels import get_backend

    def diagnose(kernel: str, params: dict) -> str | None:
        return diagnose_attention(sub.module.attention, build_case(kernel, params)) if params else None

    return kernel_suite(sub, get_backend(sub.path), {"attention": HINT}, {"attention": LESSON_CASES}, diagnose)


# --- invariants ---------------------------------------------------------------------------------


def _attend(m: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    out = np.asarray(m.attention(q, k, v, scale))
    if out.shape != q.shape or out.dtype != np.float32:
        raise CriterionFailed(f"attention returned {out.dtype}{list(out.shape)}, expected float32{list(q.shape)} (q's shape)", HINT)
    return out


def invariants(sub: Submission) -> str:
    m, rng = sub.module, np.random.default_rng(4)
    heads, kv_heads, dim = 6, 2, 8
    # one key: every query head returns the value of its own KV head, whatever q and the scale
    q = rng.standard_normal((1, heads, dim)).astype(np.float32)
    k = rng.standard_normal((1, kv_heads, dim)).astype(np.float32)
    v = np.stack([np.full(dim, 10.0 * (j + 1), np.float32) for j in range(kv_heads)])[None]  # KV head j holds 10(j+1)
    out = _attend(m, q, k, v, 0.7)
    for h in range(heads):
        want = h // (heads // kv_heads)
        if not np.allclose(out[0, h], v[0, want], rtol=1e-5):
            got = f"KV head {round(float(out[0, h, 0]) / 10 - 1)}'s value" if np.isfinite(out[0, h, 0]) else f"{out[0, h, 0]}"
            raise CriterionFailed(f"with a single key, query head {h} of {heads} ({kv_heads} KV heads) must return KV head {want}'s value; it returned {got}", HINT_GQA)
    # the weights, read out through one-hot values: out[i, h, j] is the weight of key j
    num_q, num_k = 3, 5
    q = rng.standard_normal((num_q, heads, dim)).astype(np.float32) * 2
    k = rng.standard_normal((num_k, kv_heads, dim)).astype(np.float32) * 2
    one_hot = np.broadcast_to(np.eye(num_k, dim, dtype=np.float32)[:, None], (num_k, kv_heads, dim)).copy()
    weights = _attend(m, q, k, one_hot, dim**-0.5)[..., :num_k].transpose(1, 0, 2)  # [H, Tq, Tk]
    if not np.isfinite(weights).all() or (weights < -1e-6).any():
        raise CriterionFailed("attention weights (values one-hot per key) must be finite and >= 0", HINT_MASK)
    sums = weights.sum(axis=-1)
    if not np.allclose(sums, 1.0, atol=1e-5):
        raise CriterionFailed(f"each query's attention weights must sum to 1; a chunk of {num_q} queries over {num_k} keys gave sums {np.round(sums[0], 4).tolist()}", "softmax over the keys axis, after the mask")
    future = ~causal_mask(num_q, num_k)
    seen = np.argwhere((np.abs(weights) > 1e-6) & future[None])  # [n, 3] (head, query, key)
    if len(seen):
        h, i, j = seen[0]
        raise CriterionFailed(f"{num_q} queries over {num_k} keys: query {i} (position {num_k - num_q + i}) of head {h} gave weight to key {j}, in its future", HINT_MASK)
    # causality: changing a future key and value changes nothing for the earlier queries
    q = rng.standard_normal((6, heads, dim)).astype(np.float32)
    k = rng.standard_normal((6, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((6, kv_heads, dim)).astype(np.float32)
    before = _attend(m, q, k, v, 0.5)
    k2, v2 = k.copy(), v.copy()
    k2[3:] *= -3.0
    v2[3:] += 5.0
    after = _attend(m, q, k2, v2, 0.5)
    if not np.allclose(before[:3], after[:3], rtol=1e-6, atol=1e-6):
        raise CriterionFailed("a prefill of 6: changing keys 3..5 changed the output of queries 0..2, which must not see them", HINT_MASK)
    copies = [q.copy(), k.copy(), v.copy()]
    m.attention(q, k, v, 0.5)
    if any(not np.array_equal(a, b) for a, b in zip(copies, (q, k, v), strict=True)):
        raise CriterionFailed("attention modified its input (kernels must not)", "compute into new arrays")
    # the helper
    for num_q, num_k in ((1, 1), (1, 5), (3, 5), (4, 4), (0, 3)):
        got = np.asarray(m.causal_mask(num_q, num_k))
        if got.shape != (num_q, num_k) or not np.array_equal(got.astype(bool), causal_mask(num_q, num_k)):
            raise CriterionFailed(f"causal_mask({num_q}, {num_k}) is {got.astype(int).tolist()}, want {causal_mask(num_q, num_k).astype(int).tolist()}", HINT_MASK)
    return "one key returns its KV head's value, weights >= 0 summing to 1 with none on the future, future keys change nothing, causal_mask right, inputs untouched"


# --- integration ----------------------------------------------------------------------------------


def paged_through(attention: Callable, calls: list[int]) -> Callable:
    """A ``paged_attention`` made of ``attention``: each sequence's first seq_len keys and values
    gathered through its block table (``kernels_ref.gather_pages``), then attended contiguously.
    ``calls[0]`` counts the calls that reach ``attention``."""

    def paged_attention(q: Any, k_cache: Any, v_cache: Any, block_tables: Any, query_start_loc: Any, seq_lens: Any, scale: float) -> Any:  # [T, H, D] -> [T, H, D]
        out = np.zeros_like(q)
        for s in range(len(seq_lens)):
            start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
            if end > start:
                k, v = gather_pages(k_cache, v_cache, block_tables[s], int(seq_lens[s]))
                out[start:end] = attention(q[start:end], k, v, scale)
                calls[0] += 1
        return out

    return paged_attention


def generate_contiguous(loaded: Any, backend: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of one sequence through ``ContiguousKVCache``: a prefill, then decodes."""
    from nanoserve.cache.contiguous import ContiguousKVCache
    from nanoserve.model import LlamaModel

    model = LlamaModel(loaded.config, loaded.weights, backend)
    cache = ContiguousKVCache(loaded.config, len(prompt) + max_tokens, backend)
    tokens, positions = list(prompt), np.arange(len(prompt))
    for _ in range(max_tokens):
        cache.set_positions(positions)
        hidden = model.forward(np.asarray(tokens[-len(positions):]), positions, cache)
        tokens.append(int(np.argmax(model.compute_logits(hidden[-1:])[0])))
        positions = np.array([len(tokens) - 1])
    return tokens[len(prompt):]


def integration(sub: Submission) -> str:
    from nanoserve.kernels import get_backend, register_backend

    if sub.loaded is None:
        raise CriterionFailed("no model to serve (pass --model)")
    prompt = workload(sub.loaded.config.vocab_size)[0]
    got = generate_contiguous(sub.loaded, get_backend(sub.path), prompt, 8)
    want = generate_contiguous(sub.loaded, get_backend("ref"), prompt, 8)
    if got != want:
        at = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        raise CriterionFailed(f"through ContiguousKVCache, token {at} is {got[at]}, the reference's is {want[at]}", HINT)
    calls = [0]
    name = f"lab02:{sub.path}"
    register_backend(name, types.SimpleNamespace(paged_attention=paged_through(sub.module.attention, calls)))
    detail = compare_tokens(run_engine(sub.loaded, backend=name), run_engine(sub.loaded, backend="ref"))
    return f"ContiguousKVCache: {len(got)} greedy tokens equal; the engine: {detail} ({calls[0]} calls of your attention)"


def speed(sub: Submission) -> str:
    """A 256-token prefill and a decode over 2048 keys (9 query heads, 3 KV heads), best of 5."""
    rng = np.random.default_rng(5)
    cases = {
        "prefill 256": (256, 256),
        "decode over 2048": (1, 2048),
    }
    parts = []
    for label, (num_q, num_k) in cases.items():
        q = rng.standard_normal((num_q, 9, 64)).astype(np.float32)
        k = rng.standard_normal((num_k, 3, 64)).astype(np.float32)
        v = rng.standard_normal((num_k, 3, 64)).astype(np.float32)
        times = []
        for fn in (sub.module.attention, kernels_ref.attention):
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                fn(q, k, v, 0.125)
                best = min(best, time.perf_counter() - start)
            times.append(best)
        parts.append(f"{label} {1e3 * times[0]:.2f} ms ({times[0] / times[1]:.2f}x ref)")
    return ", ".join(parts)


CRITERIA = [
    Criterion("signatures", "attention and causal_mask take the reference's parameters", signatures, gate=True),
    Criterion("imports", "no kernels_ref, kernels_cpu, kernels_cuda, nanoserve.kernels or nanoserve.check_kernels", imports, gate=True),
    Criterion("property", "the kernel suite on attention (random shapes, GQA ratios, decodes, chunks) and the lesson's cases", property_suite, points=50),
    Criterion("invariants", "one key returns its value, weights sum to 1 and skip the future, future keys change nothing", invariants, points=20),
    Criterion("integration", "ContiguousKVCache and the real engine on your attention: greedy tokens equal the reference's", integration, points=30),
]

LAB = Lab("02", "contiguous_attention", "causal GQA attention over a contiguous KV cache", "kernels_ref.attention.attention", tuple(CRITERIA), speed)
