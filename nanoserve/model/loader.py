"""``load_model``: a name or path in, config + weights + tokenizer out."""

from __future__ import annotations

import os
from dataclasses import dataclass

from nanoserve.errors import ModelLoadError
from nanoserve.kernels import Backend, get_backend
from nanoserve.model.config import LlamaConfig
from nanoserve.model.gguf_file import load_gguf
from nanoserve.model.llama import LlamaModel
from nanoserve.model.registry import resolve_model
from nanoserve.model.safetensors_file import load_hf_dir
from nanoserve.model.weights import GGUF_NAMES, HF_NAMES, LlamaWeights, build_weights
from nanoserve.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    name: str  # what the user called it (served as the model id)
    path: str
    config: LlamaConfig
    weights: LlamaWeights
    tokenizer: Tokenizer


def load_checkpoint(model: str | None = None, weights: str = "fp32") -> LoadedModel:
    """Read a model from disk into host memory, in the weight format ``weights``."""
    path = resolve_model(model)
    name = os.path.basename(os.path.normpath(model or path))
    if os.path.isdir(path):
        hf_config, tensors = load_hf_dir(path)
        config = LlamaConfig.from_hf_config(hf_config)
        tokenizer = Tokenizer.from_hf_dir(path)
        built = build_weights(config, tensors, HF_NAMES, weights)
    else:
        meta, tensors = load_gguf(path)
        embed = tensors.get(GGUF_NAMES["embed"])
        if embed is None:
            raise ModelLoadError(f"{path!r} has no tensor {GGUF_NAMES['embed']!r}")
        config = LlamaConfig.from_gguf_metadata(meta, vocab_size=int(embed.shape[0]), has_output=GGUF_NAMES["lm_head"] in tensors)
        tokenizer = Tokenizer.from_gguf_metadata(meta)
        built = build_weights(config, tensors, GGUF_NAMES, weights)
        name = name.removesuffix(".gguf")
    return LoadedModel(name=name, path=path, config=config, weights=built, tokenizer=tokenizer)


def load_model(model: str | None = None, backend: str | Backend = "ref", weights: str = "fp32") -> tuple[LlamaModel, Tokenizer]:
    """The runnable model on ``backend`` and its tokenizer."""
    loaded = load_checkpoint(model, weights)
    be = backend if isinstance(backend, Backend) else get_backend(backend)
    return LlamaModel(loaded.config, loaded.weights, be), loaded.tokenizer
