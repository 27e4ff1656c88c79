"""Random weights in the GGUF block formats ``kernels_ref.quant`` decodes.

``kernels_ref.quant`` has no kernel of its own in the contract; the cases of the
``linear_q8_0`` / ``linear_q4_0`` / ``linear_q4_1`` kernels
(:mod:`nanoserve.check_kernels.cases.linear`) build their weights with these.
"""

from __future__ import annotations

import numpy as np


def f16_bytes(rng: np.random.Generator, shape: tuple, kind: str) -> np.ndarray:  # -> uint8 [*shape, 2]
    values = rng.standard_normal(shape) * (1e-6 if kind == "tiny" else 0.02)
    if kind == "with_zero":
        values[rng.random(shape) < 0.3] = 0.0
    return values.astype(np.float16).view(np.uint8).reshape(*shape, 2)


def gguf_raw(p: dict, rng: np.random.Generator, block_bytes: int, headers: int) -> np.ndarray:
    """Random GGUF rows: ``headers`` float16 values then random quant bytes, per 32 weights."""
    blocks = p["in"] // 32
    raw = rng.integers(0, 256, (p["out"], blocks, block_bytes)).astype(np.uint8)
    for h in range(headers):
        raw[:, :, 2 * h : 2 * h + 2] = f16_bytes(rng, (p["out"], blocks), p["scales"])
    return raw.reshape(p["out"], blocks * block_bytes)
