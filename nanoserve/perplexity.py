"""Perplexity by llama.cpp's ``llama-perplexity`` protocol, run on nanoserve's own forward pass.

The protocol (``tools/perplexity/perplexity.cpp``, function ``perplexity()``):

    tokens   = tokenize(text, add_special=True)       BOS first iff the vocabulary adds one
    windows  = tokens[0:ctx], tokens[ctx:2ctx], ...   non-overlapping; a partial tail is dropped
    window i:  its first token is *replaced* by BOS (when the vocabulary adds one)
    scored:    positions first .. ctx-2, first = ctx // 2: the logits at position j are
               scored against the window's token j + 1, so each window scores
               ctx - first - 1 tokens (255 of 512), every one with >= ctx/2 tokens of context

    position:  0    1   ...  first  first+1 ...  ctx-2   ctx-1
    tokens:    BOS  t1  ...  t_f    t_f+1   ...  t_c-2   t_c-1
    scored:                  ^ predicts t_f+1 ...  ^ predicts t_c-1

    nll      = -log softmax(logits[j])[token j+1]    per scored token (float64 sums)
    ppl      = exp(mean nll)
    stderr   = ppl * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1))   llama.cpp's "+/-"

The replaced (not inserted) BOS keeps every window exactly ``ctx`` tokens and the windows
aligned with llama.cpp's, so the same text gives the same scored tokens in both. One
difference: llama-perplexity refuses text of fewer than ``2 * ctx`` tokens; here one
window (``ctx`` tokens) is enough. Text is tokenized by :meth:`Tokenizer.encode`, which
turns special tokens written in the text (``<|im_start|>``) into their ids, where
llama.cpp's tool reads them as plain text; ordinary prose tokenizes the same.

Each window is one prefill through :meth:`LlamaModel.forward` over a paged KV cache of its
own (``ceil(ctx / block_size)`` blocks in the engine's ``kv_cache_dtype``, so a quantized
KV cache is measured by the same ``store_kv`` / ``paged_attention`` the engine runs), and
:meth:`LlamaModel.compute_logits` only for the ``ctx - first - 1`` scored rows. The
engine's own pool, and any prefix it has cached, are never touched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoserve.cache.paged import AttentionMetadata, PagedKVCache
from nanoserve.errors import NanoserveError

MIN_CTX = 3  # the smallest window that scores a token: ctx - ctx // 2 - 1 >= 1


class PerplexityError(NanoserveError, ValueError):
    """The text or the window size cannot give a perplexity; the message says why."""


@dataclass(frozen=True)
class PerplexityResult:
    """What one perplexity run measured (the figures llama-perplexity prints, and more)."""

    ppl: float  # exp(mean NLL) over every scored token
    stderr: float  # llama.cpp's "+/-": ppl * the standard error of the mean NLL
    ctx: int  # tokens per window
    num_tokens: int  # tokens of the whole text
    windows: int  # windows run (the first ``windows`` of ``num_tokens // ctx``)
    tokens_scored: int  # windows * (ctx - ctx // 2 - 1)
    window_nll: list[float] = field(default_factory=list)  # [windows] mean NLL of each window
    # [tokens_scored] the most likely token at each scored position (the greedy choice with
    # the text's own tokens before it): two runs' agreement is llama.cpp's "same top" figure
    top_token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)

    @property
    def mean_nll(self) -> float:
        return math.log(self.ppl)

    def top_agreement(self, other: PerplexityResult) -> float:
        """The fraction of scored positions where both runs' most likely token is the same."""
        assert len(self.top_token_ids) == len(other.top_token_ids), "two runs over different windows"
        return float(np.mean(self.top_token_ids == other.top_token_ids))

    def to_dict(self) -> dict[str, Any]:
        """Every figure but ``top_token_ids`` (JSON-ready)."""
        return {
            "ppl": self.ppl, "stderr": self.stderr, "mean_nll": self.mean_nll, "ctx": self.ctx,
            "num_tokens": self.num_tokens, "windows": self.windows, "tokens_scored": self.tokens_scored,
            "window_nll": list(self.window_nll),
        }  # fmt: skip


def first_scored(ctx: int) -> int:
    """llama.cpp's ``first = n_ctx / 2``: the first position whose logits are scored."""
    return ctx // 2


def num_windows(num_tokens: int, ctx: int, chunks: int | None = None) -> int:
    """``num_tokens // ctx`` whole windows, or the first ``chunks`` of them (``--chunks``)."""
    whole = num_tokens // ctx
    return whole if chunks is None else min(chunks, whole)


def window_tokens(
    tokens: Sequence[int], index: int, ctx: int, bos_token_id: int | None
) -> np.ndarray:  # -> [ctx] int64
    """Window ``index``: ``tokens[index*ctx : (index+1)*ctx]``, its first token replaced by BOS if given."""
    window = np.asarray(tokens[index * ctx : (index + 1) * ctx], dtype=np.int64)
    assert window.shape == (ctx,), f"window {index} has {window.shape[0]} tokens, not {ctx}"
    if bos_token_id is not None:
        window[0] = bos_token_id
    return window


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:  # [R, V], [R] -> [R] float64
    """``-log softmax(logits[r])[targets[r]]`` per row: max-shifted, the sum of exps in float64."""
    logits = np.asarray(logits, dtype=np.float32)
    peak = logits.max(axis=1)
    sum_exp = np.exp(logits - peak[:, None]).sum(axis=1, dtype=np.float64)
    picked = logits[np.arange(len(targets)), targets]
    return peak.astype(np.float64) + np.log(sum_exp) - picked.astype(np.float64)


def summarize(nll: np.ndarray) -> tuple[float, float]:  # [N] -> (ppl, stderr)
    """``(exp(mean), llama.cpp's +/-)`` of the per-token NLLs; the +/- is nan for fewer than 2."""
    count = len(nll)
    mean = float(np.mean(nll))
    ppl = math.exp(mean)
    variance = float(np.mean(np.square(nll))) - mean * mean
    if count < 2 or variance <= 0:
        return ppl, math.nan
    return ppl, ppl * math.sqrt(variance / (count - 1))


def check_settings(ctx: int, chunks: int | None = None, max_ctx: int | None = None) -> None:
    """Raise PerplexityError unless ``ctx`` is in ``[3, max_ctx]`` and ``chunks`` is None or >= 1."""
    top = f"{max_ctx} (the model's context)" if max_ctx is not None else "the model's context"
    if (
        isinstance(ctx, bool)
        or not isinstance(ctx, int)
        or ctx < MIN_CTX
        or (max_ctx is not None and ctx > max_ctx)
    ):
        raise PerplexityError(
            f"ctx must be an integer from {MIN_CTX} (a window scores ctx - ctx//2 - 1 tokens) to {top}, got {ctx!r}"
        )
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise PerplexityError(f"chunks must be an integer >= 1 (or none: every window), got {chunks!r}")


def check_length(num_tokens: int, ctx: int) -> None:
    """Raise PerplexityError unless the text holds at least one window of ``ctx`` tokens."""
    if num_tokens == 0:
        raise PerplexityError(f"the text is empty: one window of ctx {ctx} needs {ctx} tokens")
    if num_tokens < ctx:
        raise PerplexityError(
            f"the text has {num_tokens} tokens; one window of ctx {ctx} needs {ctx} (give a longer text or a smaller ctx)"
        )


def read_text(path: str) -> str:
    """The UTF-8 text of ``path``; PerplexityError if it is missing, unreadable, or holds no text."""
    if not os.path.exists(path):
        raise PerplexityError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise PerplexityError(f"{path}: not a file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise PerplexityError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise PerplexityError(f"{path}: cannot be read ({exc.strerror})") from None
    if not text.strip():
        raise PerplexityError(f"{path} is empty{' (only whitespace)' if text else ''}: give a text to score")
    return text


def score_window(
    model: Any, window: np.ndarray, kv_cache_dtype: str, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One window [ctx] as one prefill: each scored token's NLL (float64) and the model's
    most likely token at each scored position (int64), both [ctx - first - 1]."""
    backend, ctx = model.backend, len(window)
    num_blocks = -(-ctx // block_size)
    cache = PagedKVCache(model.config, num_blocks, block_size, backend, kv_cache_dtype)
    dev = backend.to_device
    cache.metadata = AttentionMetadata(
        slot_mapping=dev(np.arange(ctx, dtype=np.int64)),  # block b holds tokens b*B .. b*B + B-1
        block_tables=dev(np.arange(num_blocks, dtype=np.int64)[None, :]),
        query_start_loc=dev(np.asarray([0, ctx], dtype=np.int64)),
        seq_lens=dev(np.asarray([ctx], dtype=np.int64)),
    )
    hidden = model.forward(dev(window), dev(np.arange(ctx, dtype=np.int64)), cache)  # [ctx, d]
    first = first_scored(ctx)
    logits = np.asarray(
        backend.to_host(model.compute_logits(hidden[first : ctx - 1]))
    )  # [ctx - first - 1, V]
    return token_nll(logits, window[first + 1 :]), logits.argmax(axis=1)


def perplexity(
    engine: Any,
    text_or_tokens: str | Sequence[int],
    ctx: int = 512,
    chunks: int | None = None,
    use_tqdm: bool = False,
) -> PerplexityResult:
    """Perplexity of a text (or of token ids, taken as they are) on ``engine``'s model.

    ``engine`` is an :class:`~nanoserve.engine.LLMEngine`: its model (weights in
    ``--weights``' format, on its backend), tokenizer, ``kv_cache_dtype``, ``block_size``
    and context limit are used. A string is tokenized with the BOS the tokenizer adds;
    each window's first token becomes BOS when the tokenizer adds one (llama.cpp's
    ``llama_vocab_get_add_bos``). ``chunks`` keeps only the first windows (llama-perplexity's
    ``--chunks``). ``use_tqdm`` shows a progress bar on stderr, one step per window.

    Raises PerplexityError for a ``ctx`` outside ``[3, the engine's context]``, an empty
    text, one shorter than ``ctx`` tokens, token ids outside the vocabulary, or ``chunks`` < 1.
    """
    check_settings(ctx, chunks, engine.max_model_len)
    tokenizer = engine.tokenizer
    tokens = (
        tokenizer.encode(text_or_tokens)
        if isinstance(text_or_tokens, str)
        else [int(t) for t in text_or_tokens]
    )
    check_length(len(tokens), ctx)
    vocab_size = engine.model.config.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise PerplexityError(f"token ids must be in [0, {vocab_size}); got {bad[:5]}")
    bos = tokenizer.bos_token_id if tokenizer.add_bos else None
    n = num_windows(len(tokens), ctx, chunks)
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"perplexity (ctx {ctx})", unit="window")
    per_window: list[np.ndarray] = []  # [windows] x [ctx - first - 1]
    top: list[np.ndarray] = []
    try:
        for i in range(n):
            window = window_tokens(tokens, i, ctx, bos)
            nll, best = score_window(
                engine.model, window, engine.config.kv_cache_dtype, engine.config.block_size
            )
            per_window.append(nll)
            top.append(best)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    ppl=f"{math.exp(sum(float(w.sum()) for w in per_window) / sum(map(len, per_window))):.4f}"
                )
    finally:
        if bar is not None:
            bar.close()
    ppl, stderr = summarize(np.concatenate(per_window))
    return PerplexityResult(
        ppl=ppl, stderr=stderr, ctx=ctx, num_tokens=len(tokens), windows=n,
        tokens_scored=sum(len(w) for w in per_window), window_nll=[float(np.mean(w)) for w in per_window],
        top_token_ids=np.concatenate(top),
    )  # fmt: skip
