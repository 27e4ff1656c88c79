"""What each weight format costs in quality on SmolLM2, held to measured bounds.

For every format in ``nanoserve.config.WEIGHT_FORMATS``, on the Hamlet excerpt in
``tests/data`` (1,901 tokens; 3 windows of 256, 381 tokens scored):

    ppl ratio     perplexity (llama-perplexity's protocol) / fp32's
    top-1 agree   the share of scored positions whose most likely token is fp32's
    greedy        32 greedy tokens after the excerpt's first 48: how many match fp32's
                  before the first departure

The bounds below were measured on the cpu backend (2026-12-02) with a margin: a kernel
that computes a format wrongly moves these figures far past them, rounding changes do
not. A format without bounds fails: measure it and add its row. The full-corpus figures
are in docs/quantization.md (``bench/quant.py``).

The 4-bit formats keep the LM head (the tied embedding) at 8 bits, as llama-quantize does
(``nanoserve.model.weights.HEAD_FORMAT``). So ``q4_1`` on this Q4_1 file is the file itself:
every Q4_1 block and the Q8_0 table re-quantize to the bytes they came from.

int4 and q4_0 have no greedy bound: fp32's first greedy token is a near-tie (its top three logits
lie within 1.1 of each other: "The" 25.17, "\\n" 24.63, "Ben" 24.12), and their weight
error (~10% RMS for int4, re-quantizing the file's Q4_1 values onto a symmetric 4-bit
grid) moves logits by more than that. Their perplexity and top-1 agreement are bounded instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pytest

from nanoserve.config import WEIGHT_FORMATS, EngineConfig
from nanoserve.engine import LLMEngine
from nanoserve.perplexity import PerplexityResult, perplexity, read_text
from nanoserve.sampling import SamplingParams

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

EXCERPT = os.path.join(os.path.dirname(__file__), "data", "shakespeare_excerpt.txt")
CTX, CHUNKS = 256, 3
PROMPT_TOKENS, GREEDY_TOKENS = 48, 32
FP32_PPL = 25.0750  # measured; transformers gives the same within 0.1% (tests/test_perplexity.py)


@dataclass(frozen=True)
class Bounds:
    max_ppl_ratio: float  # perplexity / fp32's at most this
    min_top1: float  # top-1 agreement with fp32 at least this
    min_greedy: int | None  # greedy tokens equal to fp32's before the first departure, at least


#: measured: ppl ratio, top-1 agreement, greedy prefix of 32
QUALITY_BOUNDS = {
    "fp32": Bounds(1.0, 1.0, GREEDY_TOKENS),  # the reference: its perplexity is pinned to FP32_PPL instead
    "fp16": Bounds(1.002, 0.99, 24),  # 1.00013, 0.9974, 32
    "int8": Bounds(1.025, 0.93, 24),  # 1.01309, 0.9554, 32
    "int4": Bounds(1.32, 0.63, None),  # 1.23682, 0.6798, 0 (see the module docstring)
    "q8_0": Bounds(1.02, 0.95, 24),  # 1.00538, 0.9738, 32
    "q4_0": Bounds(1.26, 0.68, None),  # 1.17303, 0.7297, 0 (as int4: a symmetric grid)
    "q4_1": Bounds(1.0005, 0.99, GREEDY_TOKENS),  # 1.00000, 1.0000, 32: the file's bytes come back (below)
    "gguf": Bounds(
        1.0005, 0.99, GREEDY_TOKENS
    ),  # 1.00000, 1.0000, 32: the file's own blocks, float activations
}


#: --activations int8 on the file's blocks (llama.cpp's arithmetic): measured 1.00517, 0.9738, 32
INT8_ACTIVATIONS_BOUNDS = Bounds(1.015, 0.95, 24)


@dataclass
class Run:
    ppl: PerplexityResult
    greedy: list[int]


def measure(engine: LLMEngine) -> Run:
    tokens = engine.tokenizer.encode(read_text(EXCERPT))
    result = perplexity(engine, tokens, ctx=CTX, chunks=CHUNKS)
    engine.add_request(
        tokens[:PROMPT_TOKENS], SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    )
    final = None
    while engine.has_unfinished_requests():
        final = engine.step()[-1]
    assert final is not None and final.finished
    return Run(result, list(final.token_ids))


@pytest.fixture(scope="module")
def fp32_run(smollm2_loaded) -> Run:
    return measure(LLMEngine(EngineConfig(weights="fp32", num_blocks=8), loaded=smollm2_loaded))


@pytest.mark.parametrize("weights", WEIGHT_FORMATS)
def test_each_weight_format_stays_within_its_measured_quality_bounds(
    weights: str, fp32_run: Run, smollm2_path: str
) -> None:
    from nanoserve.model import load_checkpoint

    assert weights in QUALITY_BOUNDS, (
        f"no quality bounds for --weights {weights}: measure it (this file's docstring) and add its row"
    )
    bounds = QUALITY_BOUNDS[weights]
    if weights == "fp32":  # the reference: its own figure is pinned
        assert fp32_run.ppl.tokens_scored == CHUNKS * (CTX - CTX // 2 - 1)
        assert fp32_run.ppl.ppl == pytest.approx(FP32_PPL, rel=1e-3)
        return
    run = measure(
        LLMEngine(EngineConfig(weights=weights, num_blocks=8), loaded=load_checkpoint(smollm2_path, weights))
    )
    ratio = run.ppl.ppl / fp32_run.ppl.ppl
    top1 = run.ppl.top_agreement(fp32_run.ppl)
    same = next((i for i, (a, b) in enumerate(zip(run.greedy, fp32_run.greedy)) if a != b), GREEDY_TOKENS)
    figures = f"{weights}: ppl {run.ppl.ppl:.4f} (x{ratio:.5f} fp32's), top-1 agreement {top1:.4f}, greedy {same}/{GREEDY_TOKENS}"
    assert math.isfinite(run.ppl.ppl) and ratio <= bounds.max_ppl_ratio, figures
    assert top1 >= bounds.min_top1, figures
    if bounds.min_greedy is not None:
        assert same >= bounds.min_greedy, figures


def test_int8_activations_on_the_files_blocks_stay_within_their_measured_quality_bounds(
    fp32_run: Run, smollm2_path: str
) -> None:
    from nanoserve.model import load_checkpoint

    config = EngineConfig(weights="gguf", activations="int8", num_blocks=8)
    run = measure(LLMEngine(config, loaded=load_checkpoint(smollm2_path, "gguf")))
    ratio = run.ppl.ppl / fp32_run.ppl.ppl
    top1 = run.ppl.top_agreement(fp32_run.ppl)
    same = next((i for i, (a, b) in enumerate(zip(run.greedy, fp32_run.greedy)) if a != b), GREEDY_TOKENS)
    figures = f"gguf + int8 activations: ppl x{ratio:.5f} fp32's, top-1 agreement {top1:.4f}, greedy {same}/{GREEDY_TOKENS}"
    bounds = INT8_ACTIVATIONS_BOUNDS
    assert ratio != 1.0 and ratio <= bounds.max_ppl_ratio, figures  # not 1: the activations really are rounded
    assert top1 >= bounds.min_top1 and same >= bounds.min_greedy, figures


def test_q4_1_on_the_q4_1_file_reproduces_its_bytes(smollm2_path: str) -> None:
    """Re-quantizing the file's dequantized Q4_1 blocks (and its Q8_0 table) with llama.cpp's
    rounding gives back exactly the bytes the file stores, as llama-quantize would."""
    from nanoserve.model import load_checkpoint

    shipped = load_checkpoint(smollm2_path, "gguf").weights
    again = load_checkpoint(smollm2_path, "q4_1").weights
    pairs = [(shipped.embed, again.embed)] + [
        (getattr(a, f), getattr(b, f)) for a, b in zip(shipped.layers, again.layers) for f in ("w_qkv", "w_o", "w_gate_up", "w_down")
    ]
    assert {(w.format, v.format) for w, v in pairs} == {("q8_0", "q8_0"), ("q4_1", "q4_1")}
    for w, v in pairs:
        assert all(np.array_equal(x, y) for x, y in zip(w.arrays, v.arrays))
