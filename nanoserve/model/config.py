"""The Llama-family configuration: every number the forward pass needs, from GGUF or HF."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanoserve.errors import ModelLoadError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of a Llama decoder (SmolLM2-135M values in comments)."""

    vocab_size: int  # 49152
    hidden_size: int  # 576
    intermediate_size: int  # 1536 (FFN width)
    num_layers: int  # 30
    num_heads: int  # 9 query heads
    num_kv_heads: int  # 3 key/value heads (GQA: 3 query heads share one KV head)
    head_dim: int  # 64
    rope_theta: float  # 100000.0
    rms_norm_eps: float  # 1e-5
    max_position_embeddings: int  # 8192 (the context length)
    tie_word_embeddings: bool  # True: the LM head reuses the embedding matrix

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], vocab_size: int, has_output: bool) -> LlamaConfig:
        """Build from GGUF key/values (``llama.*``); vocab and tying come from the tensors."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} in GGUF file; nanoserve runs {SUPPORTED_ARCHITECTURES}"
            )

        def need(key: str) -> Any:
            if f"{arch}.{key}" not in meta:
                raise ModelLoadError(f"GGUF metadata lacks '{arch}.{key}'")
            return meta[f"{arch}.{key}"]

        hidden = int(need("embedding_length"))
        heads = int(need("attention.head_count"))
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(meta.get(f"{arch}.rope.dimension_count", hidden // heads)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(need("context_length")),
            tie_word_embeddings=not has_output,
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> LlamaConfig:
        """Build from an HF ``config.json`` dict (``LlamaForCausalLM``)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r} in config.json; nanoserve runs {SUPPORTED_ARCHITECTURES}"
            )
        if cfg.get("rope_scaling"):
            raise UnsupportedModelError(f"rope_scaling {cfg['rope_scaling']!r} is not supported")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as exc:
            raise ModelLoadError(f"config.json lacks required key {exc.args[0]!r}") from exc
