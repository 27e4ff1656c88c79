"""Reading an HF checkpoint directory: ``config.json`` + ``*.safetensors``.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each
tensor name to ``{dtype, shape, data_offsets}``, then the raw bytes. NumPy has no
bfloat16, so BF16 tensors are widened to float32 here (bf16 is the top half of a float32).
"""

from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np

from nanoserve.errors import ModelLoadError, UnsupportedModelError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as a float32/float16 array."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
    except (struct.error, ValueError) as exc:
        raise ModelLoadError(f"{path!r} is not a safetensors file ({exc})") from exc
    body = memoryview(raw)[8 + header_len :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise UnsupportedModelError(f"tensor {name!r} in {path!r} has dtype {info['dtype']}; need F32/F16/BF16")
        start, end = info["data_offsets"]
        arr = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = arr
    return tensors


def load_hf_dir(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config.json as dict, all tensors)`` of an HF model directory."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ModelLoadError(f"{path!r} has no config.json; an HF model directory needs config.json + *.safetensors")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{config_path!r} is not valid JSON ({exc})") from exc
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path!r} has no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(read_safetensors(file))
    return config, tensors
