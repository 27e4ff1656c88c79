"""Reading a GGUF file: metadata, tokenizer vocabulary and tensors (quantized ones kept as bytes).

GGUF (llama.cpp's format) is one file: a header of typed key/values (architecture,
hyper-parameters, tokenizer) followed by tensors, each of a *ggml type*. The ``gguf``
package parses the container; nanoserve does the dequantization itself
(``kernels_ref.quant``), so the block layouts stay visible.

Pitfall: llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` so that its
RoPE can rotate *adjacent* pairs (x[2i], x[2i+1]). nanoserve's RoPE rotates *halves*
(x[i], x[i + D/2]) like HF Llama, so :func:`unpermute_qk_rows` undoes it on load.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from nanoserve.errors import ModelLoadError, UnsupportedModelError
from nanoserve.quant import QuantizedWeight

# ggml type id -> the name nanoserve uses
GGML_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 8: "q8_0"}


def unpermute_qk_rows(w: np.ndarray, n_heads: int) -> np.ndarray:  # [n_heads*D, ...] -> same
    """Undo llama.cpp's Q/K row permutation (works on float rows and on raw quantized rows).

    Within each head, llama.cpp stores row order (0, D/2, 1, D/2+1, ...): pairs interleaved.
    Viewing a head's rows as [D/2, 2] and transposing to [2, D/2] restores (0, 1, ..., D-1).
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: str) -> Any:
    import gguf

    if not os.path.isfile(path):
        raise ModelLoadError(f"model file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises many types on bad bytes; name the file instead
        raise ModelLoadError(f"{path!r} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def read_metadata(reader: Any) -> dict[str, Any]:
    """All key/values as Python values (arrays of strings as lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as exc:
            raise ModelLoadError(f"GGUF metadata key {key!r} cannot be read: {exc}") from exc
    return meta


def read_tensor(tensor: Any, path: str) -> np.ndarray | QuantizedWeight:
    """One tensor: float types as float arrays, quantized types as QuantizedWeight(raw bytes)."""
    type_id = int(tensor.tensor_type)
    fmt = GGML_TYPES.get(type_id)
    if fmt is None:
        raise UnsupportedModelError(
            f"tensor {tensor.name!r} in {path!r} has ggml type {tensor.tensor_type.name}; "
            f"nanoserve reads {', '.join(t.upper() for t in GGML_TYPES.values())}"
        )
    data = np.asarray(tensor.data)
    out_in = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
    if fmt in ("f32", "f16"):
        return data.reshape(out_in)
    if data.ndim != 2:
        raise UnsupportedModelError(f"quantized tensor {tensor.name!r} must be 2-D, got {out_in}")
    return QuantizedWeight(fmt, (np.ascontiguousarray(data),), out_in)


def load_gguf(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray | QuantizedWeight]]:
    """``(metadata, tensors by GGUF name)`` with Q/K rows already un-permuted."""
    reader = _open(path)
    meta = read_metadata(reader)
    arch = meta.get("general.architecture", "?")
    n_heads = int(meta.get(f"{arch}.attention.head_count", 0))
    n_kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    tensors: dict[str, np.ndarray | QuantizedWeight] = {}
    try:
        for tensor in reader.tensors:
            value = read_tensor(tensor, path)
            heads = n_heads if ".attn_q." in tensor.name else n_kv_heads if ".attn_k." in tensor.name else 0
            if heads:
                if isinstance(value, QuantizedWeight):
                    value = QuantizedWeight(value.format, (unpermute_qk_rows(value.arrays[0], heads),), value.shape)
                else:
                    value = unpermute_qk_rows(value, heads)
            tensors[tensor.name] = value
    except (ValueError, IndexError) as exc:
        raise ModelLoadError(f"{path!r}: tensor data is truncated or corrupt ({exc})") from exc
    return meta, tensors
