"""Lab 03's grader: ``store_kv`` and ``paged_attention``, the two kernels of the paged KV cache.

The student's file is a kernel backend: its ``store_kv`` and ``paged_attention`` replace the
reference's (``gather_pages`` is the lesson's helper; ``attention`` is the student's lab 02
kernel, which ``paged_attention`` may call).

    property     the kernel suite (nanoserve.check_kernels) on both kernels: random ragged
                 batches (decodes, prefills, chunks, idle sequences) with pages scattered
                 through the pool, block tables padded with out-of-range ids, -1 slots, float16
                 pages; then the lesson's fixed cases (a pool whose block count is not the
                 block size; sequences ending exactly at a block boundary)
    invariants   a -1 slot stores nothing and every other slot but the asked ones is left
                 bit for bit; paged attention equals contiguous attention on the same tokens
                 for any order of the pool's blocks, with NaN wherever it must not read; the
                 same after the student's own store_kv filled the pages
    integration  the real engine on the student's two kernels: greedy tokens equal the
                 reference engine's
    counters     from that run, the pages store_kv wrote equal the reference's, no slot outside
                 slot_mapping was written, and the pages held are set against what a contiguous
                 cache reserves
    speed        a decode batch and a store against the reference's time
"""

from __future__ import annotations

import time
import types
from typing import Any

import numpy as np

import kernels_ref
from kernels_ref.attention import gather_pages
from nanoserve.labs.common import check_imports, check_signatures, compare_tokens, load_module, run_engine
from nanoserve.labs.grader import Criterion, CriterionFailed, Lab, Submission
from nanoserve.labs.lab02 import FORBIDDEN, kernel_suite

KERNELS = ("store_kv", "paged_attention")
HINT_STORE = "slot = block * B + offset with B = k_cache.shape[1] (slots per block): block = slot // B, offset = slot % B; skip slot -1"
HINT_PAGED = "sequence s reads blocks 0 .. ceil(seq_len / B) - 1 of its table and only its first seq_len tokens; table entries past those may hold anything, even out-of-range ids"
HINT_BOUNDARY = "at a block boundary (seq_len a multiple of B) the sequence uses exactly seq_len / B blocks: ceil, not seq_len // B + 1; the next table entry is not its own"
HINT_PAST = "a slot past seq_len may hold anything, even NaN: keep only the first seq_len keys and values (masking a score with -inf is not enough: 0 * NaN is NaN)"
HINTS = {"store_kv": HINT_STORE, "paged_attention": HINT_PAGED}

_STORE = {"kv_heads": 2, "head_dim": 4, "cache_dtype": "float32", "slot_dtype": "int64", "seed": 1}
_PAGED = {"kv_heads": 2, "group": 2, "head_dim": 4, "spare_blocks": 1, "table_padding": 1, "unused_entries": "out_of_range",
          "cache_dtype": "float32", "index_dtype": "int64", "scale": None, "seed": 2}  # fmt: skip
LESSON_CASES = {
    "store_kv": [
        ("6 tokens, 2 of them -1, into 5 blocks of 4 slots", {**_STORE, "tokens": 6, "block_size": 4, "spare_blocks": 3, "skip_fraction": 0.3}),
        ("5 tokens into 3 blocks of 2 slots", {**_STORE, "tokens": 5, "block_size": 2, "spare_blocks": 0, "skip_fraction": 0.0}),
    ],
    "paged_attention": [
        ("a prefill chunk ending at a block boundary", {**_PAGED, "seqs": [(3, 8)], "block_size": 4}),
        ("decodes at a block boundary and past one", {**_PAGED, "seqs": [(1, 8), (1, 11)], "block_size": 4}),
        ("a decode, a whole prefill, a chunk and an idle sequence", {**_PAGED, "seqs": [(1, 9), (4, 4), (2, 7), (0, 3)], "block_size": 4}),
    ],
}


def signatures(sub: Submission) -> str:
    module = load_module(sub, "lab03")
    return check_signatures(module, {"store_kv": kernels_ref.store_kv, "gather_pages": gather_pages, "paged_attention": kernels_ref.paged_attention})


def imports(sub: Submission) -> str:
    detail = check_imports(sub.path, FORBIDDEN, {})
    for k in (*KERNELS, "gather_pages"):
        if getattr(getattr(sub.module, k), "__module__", "").startswith("kernels_"):
            raise CriterionFailed(f"{k} is the reference's own function", "write it yourself")
    return detail


def diagnose(kernel: str, params: dict) -> str | None:
    """A sharper hint when the failing example has a sequence ending at a block boundary."""
    if kernel == "paged_attention" and any(q and seq_len % params["block_size"] == 0 for q, seq_len in params.get("seqs", [])):
        return HINT_BOUNDARY
    return None


def property_suite(sub: Submission) -> str:
    from nanoserve.kernels import get_backend

    return kernel_suite(sub, get_backend(sub.path), HINTS, LESSON_CASES, diagnose)


# --- invariants -----------------------------------------------------------------------------------


def _invariant_store(m: Any, rng: np.random.Generator) -> None:
    """-1 slots store nothing; only the asked slots change; the asked ones hold the new K/V."""
    num_blocks, block_size, kv_heads, dim = 5, 4, 2, 4
    k_cache = rng.standard_normal((num_blocks, block_size, kv_heads, dim)).astype(np.float32)
    v_cache = rng.standard_normal(k_cache.shape).astype(np.float32)
    k_before, v_before = k_cache.copy(), v_cache.copy()
    slots = np.array([3, -1, 17, -1, 0, 9])  # -1 would be the pool's last slot (19) with numpy's negative indexing
    k = rng.standard_normal((len(slots), kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    _call(f"store_kv(slot_mapping={slots.tolist()}) into {num_blocks} blocks of {block_size}", HINT_STORE, m.store_kv, k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.reshape(-1, kv_heads, dim), v_cache.reshape(-1, kv_heads, dim)
    for t, slot in enumerate(slots):
        if slot >= 0 and not (np.array_equal(flat_k[slot], k[t]) and np.array_equal(flat_v[slot], v[t])):
            raise CriterionFailed(f"store_kv(slot_mapping={slots.tolist()}) into {num_blocks} blocks of {block_size}: slot {slot} (block {slot // block_size}, offset {slot % block_size}) does not hold token {t}'s K/V", HINT_STORE)
    asked = np.zeros(num_blocks * block_size, bool)
    asked[slots[slots >= 0]] = True
    changed = (flat_k != k_before.reshape(flat_k.shape)).any(axis=(1, 2)) | (flat_v != v_before.reshape(flat_v.shape)).any(axis=(1, 2))
    stray = np.nonzero(changed & ~asked)[0]
    if len(stray):
        what = " (a -1 slot wrote the pool's last slot)" if stray[-1] == num_blocks * block_size - 1 else ""
        raise CriterionFailed(f"store_kv(slot_mapping={slots.tolist()}) changed slot {stray.tolist()}, which it was not given{what}", "a slot of -1 marks a token that must not be stored: skip it")


def _call(what: str, hint: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``; an exception becomes a failure saying what was asked (the stub's passes through)."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as exc:
        raise CriterionFailed(f"{what}: {fn.__name__} raised {type(exc).__name__}: {exc}", hint) from exc


def _batch(rng: np.random.Generator, seqs: list[tuple[int, int]], heads: int, kv_heads: int, dim: int) -> tuple:
    """Per sequence its contiguous K/V and queries, and the concatenated q -> (ks, vs, q, query_start_loc, seq_lens)."""
    ks = [rng.standard_normal((n, kv_heads, dim)).astype(np.float32) for _, n in seqs]
    vs = [rng.standard_normal((n, kv_heads, dim)).astype(np.float32) for _, n in seqs]
    q = rng.standard_normal((sum(q for q, _ in seqs), heads, dim)).astype(np.float32)
    query_start_loc = np.concatenate([[0], np.cumsum([q for q, _ in seqs])]).astype(np.int64)
    return ks, vs, q, query_start_loc, np.array([n for _, n in seqs], np.int64)


def _tables(order: np.ndarray, seqs: list[tuple[int, int]], block_size: int, width: int, padding: int) -> np.ndarray:
    """Block tables handing out the pool's blocks in ``order``; unused entries hold ``padding``."""
    tables = np.full((len(seqs), width), padding, np.int64)
    start = 0
    for s, (_, n) in enumerate(seqs):
        used = -(-n // block_size)
        tables[s, :used] = order[start : start + used]
        start += used
    return tables


def _check_paged(m: Any, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, tables: np.ndarray, query_start_loc: np.ndarray,
                 seq_lens: np.ndarray, ks: list, vs: list, what: str, hint: str | None = None) -> None:  # fmt: skip
    """Raise unless paged_attention equals kernels_ref.attention on each sequence's own K/V.

    Without ``hint``, a wrong sequence gets the block-boundary hint when its seq_len is a
    multiple of B, the read-past-seq_len one otherwise."""
    block_size = k_cache.shape[1]
    boundary = any(n % block_size == 0 for n in seq_lens.tolist())
    out = np.asarray(_call(f"{what} (block tables {tables.tolist()}, seq_lens {seq_lens.tolist()})", hint or (HINT_BOUNDARY if boundary else HINT_PAGED),
                           m.paged_attention, q, k_cache, v_cache, tables, query_start_loc, seq_lens, 0.5))  # fmt: skip
    if out.shape != q.shape or out.dtype != np.float32:
        raise CriterionFailed(f"paged_attention returned {out.dtype}{list(out.shape)}, expected float32{list(q.shape)}", HINT_PAGED)
    for s, (k, v) in enumerate(zip(ks, vs, strict=True)):
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        want = kernels_ref.attention(q[start:end], k, v, 0.5)
        if not np.allclose(out[start:end], want, rtol=1e-4, atol=1e-5):
            gap = float(np.max(np.abs(out[start:end] - want))) if np.isfinite(out[start:end]).all() else float("nan")
            seq_hint = hint or (HINT_BOUNDARY if int(seq_lens[s]) % block_size == 0 else HINT_PAST)
            raise CriterionFailed(f"{what}: sequence {s} ({end - start} queries, seq_len {int(seq_lens[s])}, blocks {tables[s].tolist()}) differs from contiguous attention over its tokens (largest gap {gap:.3g})", seq_hint)


def _invariant_any_order(m: Any, rng: np.random.Generator) -> None:
    """Paged attention equals contiguous attention whatever the block order; NaN where it must not read."""
    block_size, heads, kv_heads, dim = 4, 4, 2, 8
    seqs = [(1, 8), (5, 5), (3, 9), (0, 2), (1, 1), (2, 4)]  # decode and chunk at a block boundary, prefill, chunk, idle, one token
    ks, vs, q, query_start_loc, seq_lens = _batch(rng, seqs, heads, kv_heads, dim)
    num_blocks = sum(-(-n // block_size) for _, n in seqs) + 2
    width = max(-(-n // block_size) for _, n in seqs) + 1
    for trial, padding in enumerate((num_blocks + 7, -1, num_blocks + 7)):
        order = rng.permutation(num_blocks)
        tables = _tables(order, seqs, block_size, width, padding)
        k_cache = np.full((num_blocks, block_size, kv_heads, dim), np.nan, np.float32)  # NaN wherever no token is
        v_cache = k_cache.copy()
        for s, (_, n) in enumerate(seqs):
            for t in range(n):
                k_cache[tables[s, t // block_size], t % block_size] = ks[s][t]
                v_cache[tables[s, t // block_size], t % block_size] = vs[s][t]
        what = f"block order {order.tolist()}, unused table entries {padding}, NaN in every slot no token holds (trial {trial})"
        _check_paged(m, q, k_cache, v_cache, tables, query_start_loc, seq_lens, ks, vs, what)


def _invariant_round_trip(m: Any, rng: np.random.Generator) -> None:
    """The student's store_kv fills the pages through slot_mapping, then paged_attention reads them back."""
    block_size, heads, kv_heads, dim = 2, 6, 3, 4
    seqs = [(3, 3), (1, 4), (2, 6)]
    ks, vs, q, query_start_loc, seq_lens = _batch(rng, seqs, heads, kv_heads, dim)
    num_blocks = sum(-(-n // block_size) for _, n in seqs) + 3
    tables = _tables(rng.permutation(num_blocks), seqs, block_size, 4, -1)
    k_cache = np.zeros((num_blocks, block_size, kv_heads, dim), np.float32)
    v_cache = np.zeros_like(k_cache)
    for s, (_, n) in enumerate(seqs):
        positions = np.arange(n)
        slots = tables[s, positions // block_size] * block_size + positions % block_size
        _call(f"store_kv of sequence {s} into {num_blocks} blocks of {block_size} (slots {slots.tolist()})", HINT_STORE, m.store_kv, ks[s], vs[s], k_cache, v_cache, slots)
    _check_paged(m, q, k_cache, v_cache, tables, query_start_loc, seq_lens, ks, vs, f"after your store_kv filled {num_blocks} blocks of {block_size}", HINT_STORE)


def invariants(sub: Submission) -> str:
    rng = np.random.default_rng(6)
    _invariant_store(sub.module, rng)
    _invariant_any_order(sub.module, rng)
    _invariant_round_trip(sub.module, rng)
    return "-1 slots store nothing and no other slot changes; paged equals contiguous attention for 3 block orders with NaN where nothing is stored; the same after your store_kv"


# --- integration and counters -----------------------------------------------------------------------


class WriteRecorder:
    """A ``store_kv`` that calls another and records what it changed in the pool.

    ``pages`` are the blocks any call wrote; ``stray`` counts slots changed that the call's
    slot_mapping did not name.
    """

    def __init__(self, store_kv: Any) -> None:
        self.store_kv = store_kv
        self.pages: set[int] = set()
        self.stray = 0
        self.calls = 0

    def __call__(self, k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any) -> None:  # [T, Hkv, D] x2, [N, B, Hkv, D] x2, [T]
        k_before, v_before = np.array(k_cache), np.array(v_cache)
        self.store_kv(k, v, k_cache, v_cache, slot_mapping)
        self.calls += 1
        block_size = k_before.shape[1]
        changed = (np.asarray(k_cache) != k_before).any(axis=(2, 3)) | (np.asarray(v_cache) != v_before).any(axis=(2, 3))  # [N, B]
        asked = np.zeros(changed.size, bool)
        slots = np.asarray(slot_mapping)
        asked[slots[slots >= 0]] = True
        changed = changed.reshape(-1)
        self.stray += int(np.count_nonzero(changed & ~asked))
        self.pages.update((np.nonzero(changed)[0] // block_size).tolist())


def _serve(loaded: Any, name: str, store_kv: Any, paged_attention: Any) -> tuple[Any, WriteRecorder]:
    from nanoserve.kernels import register_backend

    recorder = WriteRecorder(store_kv)
    register_backend(name, types.SimpleNamespace(store_kv=recorder, paged_attention=paged_attention))
    return run_engine(loaded, backend=name), recorder


def integration(sub: Submission) -> str:
    if sub.loaded is None:
        raise CriterionFailed("no model to serve (pass --model)")
    got = _serve(sub.loaded, f"lab03:{sub.path}", sub.module.store_kv, sub.module.paged_attention)
    want = _serve(sub.loaded, "lab03:reference", kernels_ref.store_kv, kernels_ref.paged_attention)
    sub.scratch["counters"] = (got, want)
    return compare_tokens(got[0], want[0]) + f" (your store_kv and paged_attention, {got[1].calls} calls each)"


def counters(sub: Submission) -> str:
    if "counters" not in sub.scratch:
        raise CriterionFailed("needs the integration run, which failed")
    (run, recorder), (ref_run, ref_recorder) = sub.scratch["counters"]
    if recorder.stray:
        raise CriterionFailed(f"store_kv changed {recorder.stray} pool slots its slot_mapping did not name", HINT_STORE)
    if len(recorder.pages) != len(ref_recorder.pages):
        raise CriterionFailed(f"store_kv wrote into {len(recorder.pages)} pages, the reference into {len(ref_recorder.pages)}", HINT_STORE)
    if run.peak_used_blocks != ref_run.peak_used_blocks:
        raise CriterionFailed(f"peak pages held {run.peak_used_blocks} (reference {ref_run.peak_used_blocks})")
    slots = run.peak_used_blocks * run.block_size
    return (f"{len(recorder.pages)} pages written (reference {len(ref_recorder.pages)}), none outside slot_mapping; "
            f"peak {run.peak_used_blocks} pages = {slots} slots against {run.contiguous_slots} for a contiguous cache ({slots / run.contiguous_slots:.1%})")  # fmt: skip


def speed(sub: Submission) -> str:
    """A decode batch (8 sequences of 255 tokens, 16-slot pages, 9 query heads over 3 KV heads) and its store, best of 5."""
    rng = np.random.default_rng(7)
    block_size, num_seqs, seq_len, kv_heads, dim = 16, 8, 255, 3, 64
    per_seq = -(-seq_len // block_size)
    k_cache = rng.standard_normal((num_seqs * per_seq + 4, block_size, kv_heads, dim)).astype(np.float32)
    v_cache = rng.standard_normal(k_cache.shape).astype(np.float32)
    tables = rng.permutation(len(k_cache))[: num_seqs * per_seq].reshape(num_seqs, per_seq)
    q = rng.standard_normal((num_seqs, 9, dim)).astype(np.float32)
    new = rng.standard_normal((num_seqs, kv_heads, dim)).astype(np.float32)
    slots = tables[:, -1] * block_size + (seq_len - 1) % block_size
    args = {
        "paged_attention": (q, k_cache, v_cache, tables, np.arange(num_seqs + 1), np.full(num_seqs, seq_len), 0.125),
        "store_kv": (new, new, k_cache, v_cache, slots),
    }
    parts = []
    for kernel, call in args.items():
        times = []
        for fn in (getattr(sub.module, kernel), getattr(kernels_ref, kernel)):
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                fn(*call)
                best = min(best, time.perf_counter() - start)
            times.append(best)
        parts.append(f"{kernel} {1e3 * times[0]:.3f} ms ({times[0] / times[1]:.2f}x ref)")
    return "decode batch of 8 x 255 tokens: " + ", ".join(parts)


CRITERIA = [
    Criterion("signatures", "store_kv, gather_pages and paged_attention take the reference's parameters", signatures, gate=True),
    Criterion("imports", "no kernels_ref, kernels_cpu, kernels_cuda, nanoserve.kernels or nanoserve.check_kernels", imports, gate=True),
    Criterion("property", "the kernel suite on store_kv and paged_attention (ragged batches, scattered pages) and the lesson's cases", property_suite, points=40),
    Criterion("invariants", "-1 slots store nothing; paged equals contiguous attention for any block order", invariants, points=20),
    Criterion("integration", "the real engine on your two kernels: greedy tokens equal the reference's", integration, points=30),
    Criterion("counters", "pages written equal the reference's, none outside slot_mapping; pages against a contiguous cache", counters, points=10),
]

LAB = Lab("03", "paged_attention", "the paged KV cache: store_kv and paged_attention", "kernels_ref.attention (store_kv, paged_attention)", tuple(CRITERIA), speed)
