"""The model: configuration, weight loading (GGUF, HF safetensors) and the Llama forward pass."""

from nanoserve.model.config import LlamaConfig
from nanoserve.model.llama import LlamaModel
from nanoserve.model.loader import LoadedModel, load_checkpoint, load_model

__all__ = ["LlamaConfig", "LlamaModel", "LoadedModel", "load_checkpoint", "load_model"]
