"""A tiny random Llama checkpoint (HF layout) for fast tests: real code paths, no download.

``make_tiny_model(path)`` writes config.json, model.safetensors, tokenizer.json (a small
byte-level BPE trained on a few sentences, with ChatML special tokens) and
tokenizer_config.json (with a ChatML chat template), deterministically from a seed.
"""

from __future__ import annotations

import json
import os

import numpy as np

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny model used in tests.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f600",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_config(vocab_size: int, **overrides: object) -> dict:
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def make_tokenizer(path: str) -> int:
    """Train and save a byte-level BPE; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHATML}, f)
    return tok.get_vocab_size()


def make_tiny_model(path: str, seed: int = 0, **config_overrides: object) -> str:
    """Write a tiny random Llama into ``path`` (created if needed); returns ``path``."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    vocab = make_tokenizer(path)
    config = tiny_config(vocab, **config_overrides)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    rng = np.random.default_rng(seed)
    d, f_, heads, kv_heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def gain() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": mat(vocab, d), "model.norm.weight": gain()}
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = mat(vocab, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "input_layernorm.weight": gain(),
                p + "self_attn.q_proj.weight": mat(heads * head_dim, d),
                p + "self_attn.k_proj.weight": mat(kv_heads * head_dim, d),
                p + "self_attn.v_proj.weight": mat(kv_heads * head_dim, d),
                p + "self_attn.o_proj.weight": mat(d, heads * head_dim),
                p + "post_attention_layernorm.weight": gain(),
                p + "mlp.gate_proj.weight": mat(f_, d),
                p + "mlp.up_proj.weight": mat(f_, d),
                p + "mlp.down_proj.weight": mat(d, f_),
            }
        )
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path
