"""Cases for ``kernels_ref.sampling``: the repetition penalties and the top-k, top-p and min-p filters.

Logits come with ties (a coarse grid) and ``-inf`` entries; the per-row parameters reach
the values that disable a filter (``top_k`` <= 0 or >= V, ``top_p`` >= 1, ``min_p`` <= 0).
``apply_penalties`` gets logits of both signs and exact zeros, tokens seen in the prompt,
the output, both or neither, counts up to a few hundred, and penalties that are off
(1 / 0 / 0), in OpenAI's range [-2, 2] (negative ones reward repetition) and beyond.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from nanoserve.check_kernels.cases.draw import case_rng, normal, seeds, strategies
from nanoserve.check_kernels.limits import Limits
from nanoserve.check_kernels.spec import KernelSpec
from nanoserve.check_kernels.tolerances import EXACT, PENALTY, penalty_magnitude


def _filter_params(limits: Limits, per_row: Callable[[int], Any], extra: dict | None = None) -> Any:
    st = strategies()

    @st.composite
    def params(draw: Callable) -> dict:
        vocab = draw(st.integers(1, limits.max_vocab))
        rows = draw(st.integers(0, limits.max_seqs))
        values = draw(st.lists(per_row(vocab), min_size=rows, max_size=rows))
        fields = draw(st.fixed_dictionaries({
            "ties": st.booleans(),  # logits on a coarse grid: many exactly equal values
            "neg_inf": st.booleans(),  # some logits already -inf (never a whole row)
            "seed": seeds(),
            **(extra or {}),
        }))  # fmt: skip
        return {"vocab": vocab, "values": values, **fields}

    return params()


def _logits(p: dict) -> np.ndarray:  # -> [S, V] float32
    rng = case_rng(p)
    logits = normal(rng, (len(p["values"]), p["vocab"]), 3.0)
    if p["ties"]:
        logits = np.round(logits)
    if p["neg_inf"]:
        logits[rng.random(logits.shape) < 0.3] = -np.inf
        logits[:, 0] = np.where(np.isfinite(logits[:, 0]), logits[:, 0], 0.0)
    return logits.astype(np.float32)


def _top_k_params(limits: Limits) -> Any:
    return _filter_params(limits, lambda vocab: strategies().integers(-1, vocab + 1))


def _top_k_build(p: dict) -> tuple:  # -> logits [S, V], top_k [S]
    return _logits(p), np.array(p["values"], dtype=np.int64).reshape(-1)


def _top_p_params(limits: Limits) -> Any:
    st = strategies()
    p = st.one_of(st.floats(0.01, 0.99), st.just(1.0), st.floats(1e-6, 0.01), st.floats(1.0, 2.0))
    return _filter_params(limits, lambda vocab: p)


def _top_p_build(p: dict) -> tuple:  # -> logits [S, V], top_p [S]
    return _logits(p), np.array(p["values"], dtype=np.float64).reshape(-1)


def _min_p_params(limits: Limits) -> Any:
    st = strategies()
    p = st.one_of(st.just(0.0), st.floats(1e-4, 1.0), st.just(-0.5))
    return _filter_params(limits, lambda vocab: p, {"dtype": st.sampled_from(["float32", "float64"])})


def _min_p_build(p: dict) -> tuple:  # -> logits [S, V], min_p [S]
    return _logits(p), np.array(p["values"], dtype=p["dtype"]).reshape(-1)


def _penalties_params(limits: Limits) -> Any:
    st = strategies()
    row = st.fixed_dictionaries({
        "presence": st.one_of(st.just(0.0), st.floats(-2.0, 2.0, width=32)),
        "frequency": st.one_of(st.just(0.0), st.floats(-2.0, 2.0, width=32)),
        "repetition": st.one_of(st.just(1.0), st.floats(0.0625, 3.0, width=32), st.floats(1.0, 1e3, width=32)),
    })  # fmt: skip
    return _filter_params(limits, lambda vocab: row, {
        "seen": st.floats(0.0, 1.0),  # fraction of the vocabulary in the prompt, and in the output
        "max_count": st.sampled_from([1, 3, 300]),
    })  # fmt: skip


def _penalties_build(p: dict) -> tuple:  # -> logits [S, V], prompt_mask [S, V], output_counts [S, V], 3 x [S]
    logits = _logits(p)
    rng = np.random.default_rng(p["seed"] + 1)
    logits[rng.random(logits.shape) < 0.1] = 0.0  # neither > 0 nor < 0
    prompt_mask = rng.random(logits.shape) < p["seen"]
    in_output = rng.random(logits.shape) < p["seen"]
    output_counts = np.where(in_output, rng.integers(1, p["max_count"] + 1, logits.shape), 0).astype(np.int32)
    presence, frequency, repetition = (
        np.array([row[name] for row in p["values"]], dtype=np.float32)
        for name in ("presence", "frequency", "repetition")
    )
    return logits, prompt_mask, output_counts, presence, frequency, repetition


def _penalties_edge_cases(limits: Limits) -> list[dict]:
    base = {"ties": False, "neg_inf": True, "seed": 0, "seen": 0.5, "max_count": 3}
    off = {"presence": 0.0, "frequency": 0.0, "repetition": 1.0}
    strong = {"presence": 2.0, "frequency": -2.0, "repetition": 1.5}
    return [
        {**base, "vocab": 5, "values": []},
        {**base, "vocab": 7, "values": [off, strong]},
        {**base, "vocab": 1, "values": [strong], "seen": 1.0},
    ]


def _filter_edge_cases(per_row: Any) -> Callable[[Limits], list[dict]]:
    def cases(limits: Limits) -> list[dict]:
        base = {"ties": False, "neg_inf": False, "seed": 0}
        return [{**base, "vocab": 5, "values": []}, {**base, "vocab": 1, "values": [per_row]}]

    return cases


def _with_dtype(cases: Callable[[Limits], list[dict]]) -> Callable[[Limits], list[dict]]:
    return lambda limits: [{**case, "dtype": "float32"} for case in cases(limits)]


SPECS: list[KernelSpec] = [
    KernelSpec("apply_penalties", _penalties_params, _penalties_build, PENALTY,
               magnitude=penalty_magnitude, edge_cases=_penalties_edge_cases),
    KernelSpec("top_k_filter", _top_k_params, _top_k_build, EXACT, edge_cases=_filter_edge_cases(1)),
    KernelSpec("top_p_filter", _top_p_params, _top_p_build, EXACT, edge_cases=_filter_edge_cases(0.5)),
    KernelSpec("min_p_filter", _min_p_params, _min_p_build, EXACT,
               edge_cases=_with_dtype(_filter_edge_cases(0.5))),
]  # fmt: skip
