"""What the sampler does to logits: repetition penalties, then the top-k, top-p and min-p filters.

``apply_penalties`` lowers the logits of tokens a sequence has already seen (vLLM's
semantics, see its docstring); it runs first, on the rows of requests that ask for it.

Each filter takes a batch of logits [S, V] and one parameter per row, and returns a copy
in which the tokens the filter removes are set to ``-inf`` (so a following softmax gives
them probability 0). A row whose parameter disables the filter is returned unchanged. At
least one token always survives: the most likely one.
"""

import numpy as np

from kernels_ref.activation import softmax


def apply_penalties(
    logits: np.ndarray,  # [S, V] float32
    prompt_mask: np.ndarray,  # [S, V] bool: token v occurs in row s's prompt
    output_counts: np.ndarray,  # [S, V] int32: times token v occurs in row s's output so far
    presence: np.ndarray,  # [S] float32: presence_penalty of each row
    frequency: np.ndarray,  # [S] float32: frequency_penalty of each row
    repetition: np.ndarray,  # [S] float32 > 0: repetition_penalty of each row
) -> np.ndarray:  # [S, V] float32, a new array
    """Penalise tokens already seen, as vLLM does (``apply_penalties`` in its layers/utils.py).

    For every row s and token v, in float32, in this order::

        seen   = prompt_mask[s, v] or output_counts[s, v] > 0
        x      = logits[s, v]
        if seen:  x = x / repetition[s] if x > 0 else x * repetition[s]   (CTRL's penalty)
        x      = x - frequency[s] * output_counts[s, v]                    (OpenAI's)
        x      = x - presence[s] * (output_counts[s, v] > 0)               (OpenAI's)

    The repetition penalty looks at prompt and output tokens; frequency and presence look
    at output tokens only. ``repetition = 1``, ``frequency = presence = 0`` leave a row's
    values unchanged, and ``-inf`` (a masked token) stays ``-inf``.
    """
    presence = presence.astype(np.float32)[:, None]
    frequency = frequency.astype(np.float32)[:, None]
    in_output = output_counts > 0
    repetition = np.where(prompt_mask | in_output, repetition.astype(np.float32)[:, None], np.float32(1.0))
    out = np.where(logits > 0, logits / repetition, logits * repetition)
    out = out - frequency * output_counts.astype(np.float32)
    return (out - presence * in_output.astype(np.float32)).astype(np.float32, copy=False)


def top_k_filter(logits: np.ndarray, top_k: np.ndarray) -> np.ndarray:  # [S, V], int [S] -> [S, V]
    """Keep the k largest logits of each row (ties with the k-th are kept too).

    ``top_k[s] <= 0`` or ``>= V`` disables the filter for row s.
    """
    out = logits.copy()
    vocab = logits.shape[-1]
    for s in np.nonzero((top_k > 0) & (top_k < vocab))[0]:
        kth_largest = np.partition(logits[s], vocab - top_k[s])[vocab - top_k[s]]
        out[s, logits[s] < kth_largest] = -np.inf
    return out


def top_p_filter(logits: np.ndarray, top_p: np.ndarray) -> np.ndarray:  # [S, V], float [S] -> [S, V]
    """Keep the smallest set of most likely tokens whose probabilities sum to >= top_p.

    Sort the row's probabilities descending; token at rank r is kept iff the mass of the
    tokens ranked before it is < top_p (so the top token is always kept).
    ``top_p[s] >= 1`` disables the filter for row s; top_p must be > 0.
    """
    out = logits.copy()
    for s in np.nonzero(top_p < 1.0)[0]:
        order = np.argsort(-logits[s], kind="stable")
        probs = softmax(logits[s, order].astype(np.float64))
        mass_before = np.cumsum(probs) - probs
        out[s, order[mass_before >= top_p[s]]] = -np.inf
    return out


def min_p_filter(logits: np.ndarray, min_p: np.ndarray) -> np.ndarray:  # [S, V], float [S] -> [S, V]
    """Keep tokens whose probability is at least ``min_p * p_max`` of their row.

    In logit space: ``logit >= max_logit + log(min_p)``. ``min_p[s] <= 0`` disables it.
    """
    out = logits.copy()
    rows = np.nonzero(min_p > 0.0)[0]
    if len(rows):
        threshold = logits[rows].max(axis=-1, keepdims=True) + np.log(min_p[rows])[:, None]
        sub = out[rows]
        sub[logits[rows] < threshold] = -np.inf
        out[rows] = sub
    return out
