"""Perplexity by llama-perplexity's protocol: the windows, the scored half, the figures, the CLI.

The protocol is checked against a direct NumPy computation on the tiny model (whole
windows only, BOS replacing each window's first token, logits at ctx//2 .. ctx-2 scored
against the next token, llama.cpp's +/-), and the fp32 figure against HF transformers'
on SmolLM2: the same token windows and the same scored positions, within 0.1%.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from nanoserve import cli
from nanoserve import perplexity as ppl_module
from nanoserve.config import EngineConfig
from nanoserve.engine import LLMEngine
from nanoserve.perplexity import PerplexityError, perplexity, read_text

EXCERPT = os.path.join(os.path.dirname(__file__), "data", "shakespeare_excerpt.txt")


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: str, tiny_loaded) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_model_dir, backend="ref", num_blocks=4), loaded=tiny_loaded)


@pytest.fixture(scope="module")
def tiny_tokens(tiny_engine: LLMEngine) -> list[int]:
    ids = tiny_engine.tokenizer.encode(read_text(EXCERPT))
    return ids[:203]  # 12 windows of 16 and an 11-token tail the protocol drops


def direct_nll(
    engine: LLMEngine, window: list[int]
) -> tuple[np.ndarray, np.ndarray]:  # [ctx] -> [ctx - ctx//2 - 1] x2
    """The scored tokens' NLL and argmax of one window, by hand: contiguous cache, full log-softmax."""
    from nanoserve.cache.contiguous import ContiguousKVCache

    model, ctx = engine.model, len(window)
    cache = ContiguousKVCache(model.config, ctx, model.backend)
    positions = np.arange(ctx)
    cache.set_positions(positions)
    logits = np.asarray(
        model.compute_logits(model.forward(np.asarray(window), positions, cache)), dtype=np.float64
    )
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    rows = np.arange(ctx // 2, ctx - 1)  # position j predicts token j + 1
    return -log_probs[rows, np.asarray(window)[rows + 1]], logits[rows].argmax(axis=1)


def expected(
    engine: LLMEngine, tokens: list[int], ctx: int, bos: int | None, windows: int
) -> tuple[float, float, int, np.ndarray]:
    """(ppl, llama.cpp's +/-, tokens scored, top tokens) over the first ``windows`` windows, by hand."""
    nll, top = [], []
    for i in range(windows):
        window = list(tokens[i * ctx : (i + 1) * ctx])
        if bos is not None:
            window[0] = bos
        window_nll, window_top = direct_nll(engine, window)
        nll.append(window_nll)
        top.append(window_top)
    all_nll = np.concatenate(nll)
    ppl = math.exp(all_nll.mean())
    return ppl, ppl * all_nll.std(ddof=1) / math.sqrt(len(all_nll)), len(all_nll), np.concatenate(top)


# --- the protocol --------------------------------------------------------------------------


def test_whole_windows_score_their_second_half_and_drop_the_tail(
    tiny_engine: LLMEngine, tiny_tokens: list[int]
) -> None:
    result = perplexity(tiny_engine, tiny_tokens, ctx=16)
    ppl, stderr, scored, top = expected(tiny_engine, tiny_tokens, 16, None, windows=12)
    assert (result.windows, result.tokens_scored, result.num_tokens) == (12, 12 * 7, 203)
    assert result.tokens_scored == scored
    assert result.ppl == pytest.approx(ppl, rel=1e-5)
    assert result.stderr == pytest.approx(stderr, rel=1e-4)
    assert len(result.window_nll) == 12
    assert np.array_equal(result.top_token_ids, top) and result.top_agreement(result) == 1.0
    assert math.exp(np.mean(result.window_nll)) == pytest.approx(result.ppl, rel=1e-9)  # equal-sized windows


def test_bos_replaces_each_windows_first_token_when_the_tokenizer_adds_one(
    tiny_engine: LLMEngine, tiny_tokens: list[int]
) -> None:
    bos = tiny_engine.tokenizer.backend.token_to_id("<|im_start|>")
    engine = copy.copy(tiny_engine)
    engine.tokenizer = copy.copy(tiny_engine.tokenizer)
    engine.tokenizer.add_bos, engine.tokenizer.bos_token_id = True, bos
    with_bos = perplexity(engine, tiny_tokens, ctx=16, chunks=3)
    ppl, _, _, _ = expected(engine, tiny_tokens, 16, bos, windows=3)
    assert with_bos.ppl == pytest.approx(ppl, rel=1e-5)
    assert with_bos.windows == 3 and with_bos.num_tokens == len(tiny_tokens)  # replaced, not inserted
    assert with_bos.ppl != pytest.approx(perplexity(tiny_engine, tiny_tokens, ctx=16, chunks=3).ppl, rel=1e-6)


def test_a_text_is_tokenized_with_the_tokenizers_own_bos_rule(tiny_engine: LLMEngine) -> None:
    text = read_text(EXCERPT)[:900]
    ids = tiny_engine.tokenizer.encode(text)
    assert perplexity(tiny_engine, text, ctx=32).ppl == perplexity(tiny_engine, ids, ctx=32).ppl


@pytest.mark.parametrize("ctx", [3, 7, 10])
def test_odd_and_small_windows_score_from_ctx_over_2(
    tiny_engine: LLMEngine, tiny_tokens: list[int], ctx: int
) -> None:
    result = perplexity(tiny_engine, tiny_tokens, ctx=ctx, chunks=4)
    ppl, _, scored, _ = expected(tiny_engine, tiny_tokens, ctx, None, windows=4)
    assert result.tokens_scored == scored == 4 * (ctx - ctx // 2 - 1)
    assert result.ppl == pytest.approx(ppl, rel=1e-5)


def test_the_engines_kv_cache_dtype_and_block_size_reach_the_window_cache(
    tiny_model_dir: str, tiny_loaded, tiny_tokens: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    made = []
    real = ppl_module.PagedKVCache

    def recording(config, num_blocks, block_size, backend, dtype):  # noqa: ANN001, ANN202
        made.append((num_blocks, block_size, dtype))
        return real(config, num_blocks, block_size, backend, dtype)

    monkeypatch.setattr(ppl_module, "PagedKVCache", recording)
    engine = LLMEngine(
        EngineConfig(
            model=tiny_model_dir, backend="ref", num_blocks=4, block_size=8, kv_cache_dtype="float16"
        ),
        loaded=tiny_loaded,
    )
    half = perplexity(engine, tiny_tokens, ctx=20, chunks=2)
    assert made == [(3, 8, "float16")] * 2  # ceil(20 / 8) blocks per window, one cache per window
    monkeypatch.undo()
    full = perplexity(
        LLMEngine(EngineConfig(model=tiny_model_dir, backend="ref", num_blocks=4), loaded=tiny_loaded),
        tiny_tokens,
        ctx=20,
        chunks=2,
    )
    assert half.ppl == pytest.approx(full.ppl, rel=1e-3)


def test_token_nll_is_a_stable_negative_log_softmax() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    nll = ppl_module.token_nll(logits, np.array([0, 2]))
    assert nll == pytest.approx([0.0, math.log(3.0)], abs=1e-6)


def test_summary_is_llama_cpps_ppl_and_plus_minus() -> None:
    nll = np.array([1.0, 2.0, 4.0])
    ppl, stderr = ppl_module.summarize(nll)
    mean = 7.0 / 3.0
    assert ppl == pytest.approx(math.exp(mean))
    assert stderr == pytest.approx(math.exp(mean) * math.sqrt((21.0 / 3.0 - mean**2) / 2.0))
    assert math.isnan(ppl_module.summarize(np.array([1.5]))[1])


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ctx": 2}, "ctx must be an integer from 3"),
        ({"ctx": 513}, "to 512 (the model's context), got 513"),
        ({"ctx": 16.0}, "ctx must be an integer"),
        ({"ctx": 16, "chunks": 0}, "chunks must be an integer >= 1"),
        ({"ctx": 300}, "the text has 203 tokens; one window of ctx 300 needs 300"),
    ],
)
def test_bad_settings_and_short_texts_are_refused_with_the_reason(
    tiny_engine: LLMEngine, tiny_tokens: list[int], kwargs: dict, message: str
) -> None:
    with pytest.raises(PerplexityError, match=message.replace("(", r"\(").replace(")", r"\)")):
        perplexity(tiny_engine, tiny_tokens, **kwargs)


def test_empty_text_and_unknown_token_ids_are_refused(tiny_engine: LLMEngine) -> None:
    with pytest.raises(PerplexityError, match="the text is empty"):
        perplexity(tiny_engine, [], ctx=16)
    with pytest.raises(PerplexityError, match=r"token ids must be in \[0, "):
        perplexity(tiny_engine, [10**6] * 16, ctx=16)


def test_read_text_names_a_missing_empty_or_binary_file(tmp_path) -> None:
    with pytest.raises(PerplexityError, match="no such file"):
        read_text(str(tmp_path / "absent.txt"))
    with pytest.raises(PerplexityError, match="not a file"):
        read_text(str(tmp_path))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PerplexityError, match="empty.txt is empty: give a text"):
        read_text(str(tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(PerplexityError, match=r"is empty \(only whitespace\)"):
        read_text(str(tmp_path / "blank.txt"))
    (tmp_path / "binary.txt").write_bytes(b"ab\xff\xfe")
    with pytest.raises(PerplexityError, match="not UTF-8 text"):
        read_text(str(tmp_path / "binary.txt"))


# --- the command line ---------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = cli.main(["perplexity", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_errors_are_one_line_each(tiny_model_dir: str, tmp_path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Who's there?")
    cases = [
        ([str(tmp_path / "absent.txt")], "absent.txt: no such file"),
        ([str(tmp_path / "empty.txt")], "empty.txt is empty"),
        (
            [str(tmp_path / "short.txt"), "--ctx", "64"],
            "short.txt: the text has 10 tokens; one window of ctx 64 needs 64",
        ),
        ([EXCERPT, "--ctx", "1"], "ctx must be an integer from 3"),
        ([EXCERPT, "--ctx", "1024"], "to 512 (the model's context), got 1024"),
        ([EXCERPT, "--chunks", "0"], "chunks must be an integer >= 1"),
    ]
    for args, message in cases:
        code, out, err = run_cli(capsys, *args, "--model", tiny_model_dir, "--backend", "ref")
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and out == "", (args, err)
        assert len(errors) == 1 and message in errors[0], (args, err)


def test_cli_prints_llama_perplexitys_final_estimate(
    tiny_model_dir: str, tiny_engine: LLMEngine, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = run_cli(
        capsys, EXCERPT, "--model", tiny_model_dir, "--backend", "ref", "--ctx", "64", "--chunks", "3"
    )
    assert code == 0, err
    expect = perplexity(tiny_engine, read_text(EXCERPT), ctx=64, chunks=3)
    lines = out.splitlines()
    assert "3 windows of 64, 31 scored in each" in lines[0]
    assert lines[1].startswith("[1]") and lines[1].count("[") == 3
    assert lines[2] == f"Final estimate: PPL = {expect.ppl:.4f} +/- {expect.stderr:.5f}"


def test_cli_json_is_one_object_and_the_progress_bar_goes_to_stderr(
    tiny_model_dir: str, tiny_engine: LLMEngine
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nanoserve", "perplexity", EXCERPT, "--model", tiny_model_dir, "--backend", "ref",
         "--ctx", "48", "--chunks", "2", "--kv-cache-dtype", "float16", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    expect = perplexity(tiny_engine, read_text(EXCERPT), ctx=48, chunks=2)
    assert data["ppl"] == pytest.approx(expect.ppl, rel=1e-3)  # float16 pages: rounding only
    assert (data["ctx"], data["windows"], data["tokens_scored"], data["kv_cache_dtype"]) == (
        48,
        2,
        46,
        "float16",
    )
    assert data["num_tokens"] == expect.num_tokens and len(data["window_nll"]) == 2
    assert {"stderr", "mean_nll", "weights", "backend", "model", "file"} <= set(data)
    assert "perplexity (ctx 48)" in proc.stderr and "2/2" in proc.stderr


# --- against HF transformers on SmolLM2 ---------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_fp32_perplexity_equals_transformers_on_the_same_windows(smollm2_path: str, smollm2_loaded) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    ctx, windows = 512, 2
    engine = LLMEngine(EngineConfig(weights="fp32", num_blocks=1), loaded=smollm2_loaded)
    tokens = smollm2_loaded.tokenizer.encode(read_text(EXCERPT))
    assert len(tokens) >= windows * ctx and not smollm2_loaded.tokenizer.add_bos  # SmolLM2: no BOS to replace
    ours = perplexity(engine, tokens, ctx=ctx, chunks=windows)

    torch.set_num_threads(2)
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32
    )
    hf.eval()
    nll, top = [], []
    with torch.no_grad():
        for i in range(windows):
            window = torch.tensor([tokens[i * ctx : (i + 1) * ctx]])
            log_probs = torch.log_softmax(hf(window).logits[0].double(), dim=-1)  # [ctx, V]
            rows = torch.arange(ctx // 2, ctx - 1)
            nll.append(-log_probs[rows, window[0, rows + 1]])
            top.append(log_probs[rows].argmax(dim=-1))
    nll_all = torch.cat(nll)
    hf_ppl = math.exp(nll_all.mean().item())
    assert ours.tokens_scored == len(nll_all) == windows * 255
    assert abs(ours.ppl / hf_ppl - 1) < 1e-3, (ours.ppl, hf_ppl)
    hf_stderr = hf_ppl * nll_all.std().item() / math.sqrt(len(nll_all))
    assert ours.stderr == pytest.approx(hf_stderr, rel=1e-2)
    assert np.mean(ours.top_token_ids == torch.cat(top).numpy()) >= 0.99  # near-ties may flip by rounding
