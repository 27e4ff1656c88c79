"""Bounds on the shapes the kernel-correctness suite draws, and its two sizes.

The case generators (:mod:`nanoserve.check_kernels.cases`) take a :class:`Limits` and
draw every dimension within it; ``check-kernels --size`` picks one of :data:`LIMITS`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds on the shapes the suite draws."""

    max_tokens: int  # T: query tokens in a batch, rows of a norm / linear input
    max_seqs: int  # S: sequences in a batch, rows of the logit filters
    max_seq_len: int  # tokens in a sequence's KV cache
    max_kv_heads: int  # Hkv
    max_group: int  # H / Hkv (GQA ratio)
    head_dims: tuple[int, ...]  # D (even)
    block_sizes: tuple[int, ...]  # B
    max_width: int  # d of rms_norm, F of silu_mul, n of softmax rows
    max_vocab: int  # V of the logit filters
    max_in_blocks: int  # linear in_features = 32 * blocks (GGUF block size)
    max_out: int  # linear out_features
    max_position: int  # RoPE positions


#: For the CUDA simulator and CI: tiny shapes (every simulated barrier costs ~1 ms).
SMALL = Limits(
    max_tokens=6, max_seqs=3, max_seq_len=24, max_kv_heads=2, max_group=3,
    head_dims=(2, 4, 8), block_sizes=(1, 2, 4, 8, 16), max_width=24, max_vocab=40,
    max_in_blocks=2, max_out=8, max_position=8192,
)  # fmt: skip

#: For a real GPU or a NumPy backend: shapes up to the default model's.
LARGE = Limits(
    max_tokens=64, max_seqs=8, max_seq_len=300, max_kv_heads=4, max_group=4,
    head_dims=(4, 8, 16, 64, 128), block_sizes=(1, 4, 8, 16, 32), max_width=1536,
    max_vocab=4096, max_in_blocks=8, max_out=96, max_position=8192,
)  # fmt: skip

LIMITS = {"small": SMALL, "large": LARGE}
