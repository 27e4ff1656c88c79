"""Loading GGUF files and HF directories: the same weights give the same logits, whatever
the container, the tensor type or the in-memory weight format; broken inputs fail with
errors that name what is wrong.

The GGUF files are written here with ``gguf.GGUFWriter`` from the tiny model's weights,
the way llama.cpp's converter writes them: Q and K rows permuted for adjacent-pair RoPE,
matrices quantized by the ``gguf`` package itself.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from safetensors.numpy import load_file, save_file

from nanoserve.cache.contiguous import ContiguousKVCache
from nanoserve.errors import ModelLoadError, UnsupportedModelError
from nanoserve.model import load_checkpoint, load_model
from nanoserve.model.gguf_file import load_gguf, unpermute_qk_rows
from nanoserve.quant import QuantizedWeight
from nanoserve.tokenizer import Tokenizer

Q = GGMLQuantizationType
NUM_HEADS, NUM_KV_HEADS = 4, 2
PROMPT_IDS = [5, 17, 42, 100, 7, 250, 3, 64, 99]

HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
for _i in range(2):
    for _hf, _gg in [
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ]:
        HF_TO_GGUF[f"model.layers.{_i}.{_hf}.weight"] = f"blk.{_i}.{_gg}.weight"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:  # [n_head * D, in] -> same
    """What llama.cpp's converter does to Wq (n_head = H) and Wk (n_head = Hkv)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def round_trip(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The float32 matrix a GGUF tensor of type qtype holds after quantizing w."""
    if qtype == Q.F32:
        return w
    return gguf_dequantize(gguf_quantize(w, qtype), qtype).astype(np.float32).reshape(w.shape)


def write_gguf(
    path: str,
    hf_dir: str,
    qtype: GGMLQuantizationType,
    arch: str = "llama",
    overrides: dict[str, GGMLQuantizationType] | None = None,
) -> str:
    """The tiny HF model as a llama.cpp-style GGUF: matrices in ``qtype`` (norms stay F32),
    Q/K rows permuted; ``overrides`` gives single tensors another type."""
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    with open(os.path.join(hf_dir, "tokenizer.json")) as f:
        tok = json.load(f)
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {a["content"] for a in tok["added_tokens"]}

    writer = GGUFWriter(path, arch)
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(NUM_HEADS)
    writer.add_head_count_kv(NUM_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3 = control
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(json.load(open(os.path.join(hf_dir, "tokenizer_config.json")))["chat_template"])
    for hf_name, gguf_name in HF_TO_GGUF.items():
        w = tensors[hf_name]
        if ".attn_q." in gguf_name:
            w = llama_cpp_permute(w, NUM_HEADS)
        elif ".attn_k." in gguf_name:
            w = llama_cpp_permute(w, NUM_KV_HEADS)
        tensor_type = (overrides or {}).get(gguf_name, qtype if w.ndim == 2 else Q.F32)
        if tensor_type == Q.F32:
            writer.add_tensor(gguf_name, w)
        else:
            writer.add_tensor(gguf_name, gguf_quantize(w, tensor_type), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_hf_twin(path: str, hf_dir: str, qtype: GGMLQuantizationType) -> str:
    """An HF directory with the weights the GGUF of type qtype holds (unpermuted, dequantized)."""
    shutil.copytree(hf_dir, path)
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    twin = {name: round_trip(w, qtype) if w.ndim == 2 else w for name, w in tensors.items()}
    save_file(twin, os.path.join(path, "model.safetensors"))
    return path


def logits_of(model_path: str, weights: str = "fp32", ids: list[int] = PROMPT_IDS) -> np.ndarray:  # -> [T, V]
    """Logits of every position of one prompt, prefilled in one forward pass."""
    model, _ = load_model(model_path, weights=weights)
    cache = ContiguousKVCache(model.config, len(ids), model.backend)
    positions = np.arange(len(ids))
    cache.set_positions(positions)
    hidden = model.forward(np.array(ids), positions, cache)
    return np.asarray(model.compute_logits(hidden))


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def gguf_files(gguf_dir: str, tiny_model_dir: str) -> dict[str, str]:
    """One GGUF file per tensor type, by type name."""
    return {
        qtype.name: write_gguf(os.path.join(gguf_dir, f"tiny-{qtype.name}.gguf"), tiny_model_dir, qtype)
        for qtype in (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
    }


@pytest.fixture(scope="module")
def fp32_logits(tiny_model_dir: str) -> np.ndarray:
    return logits_of(tiny_model_dir)


# --- the Q/K permutation ------------------------------------------------------------------


def test_unpermute_qk_rows_inverts_llama_cpp_permutation_on_float_and_raw_rows() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((NUM_HEADS * 16, 64)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk_rows(llama_cpp_permute(w, NUM_HEADS), NUM_HEADS), w)
    raw = gguf_quantize(w, Q.Q4_1)  # rows of raw blocks move as a whole
    np.testing.assert_array_equal(unpermute_qk_rows(llama_cpp_permute(raw, NUM_HEADS), NUM_HEADS), raw)


def test_adjacent_pair_rope_on_permuted_rows_equals_halves_rope_on_original_rows() -> None:
    """Why the permutation exists: llama.cpp rotates pairs (2i, 2i+1) of the permuted
    projection; that is the halves rotation (i, i + D/2) of the original one, reordered."""
    import kernels_ref

    rng = np.random.default_rng(1)
    head_dim, pos, theta = 16, 37, 10000.0
    wq = rng.standard_normal((NUM_HEADS * head_dim, 64))
    x = rng.standard_normal(64)
    halves = kernels_ref.rope((wq @ x).reshape(1, NUM_HEADS, head_dim).astype(np.float32), np.array([pos]), theta)
    q_perm = (llama_cpp_permute(wq, NUM_HEADS) @ x).reshape(NUM_HEADS, head_dim // 2, 2)
    angles = pos * theta ** (-2.0 * np.arange(head_dim // 2) / head_dim)
    z = (q_perm[..., 0] + 1j * q_perm[..., 1]) * np.exp(1j * angles)  # rotate adjacent pairs
    adjacent = np.stack([z.real, z.imag], axis=-1).reshape(NUM_HEADS, head_dim)
    back = unpermute_qk_rows(adjacent.reshape(NUM_HEADS * head_dim), NUM_HEADS).reshape(NUM_HEADS, head_dim)
    np.testing.assert_allclose(back, halves[0], rtol=1e-4, atol=1e-4)


# --- GGUF == HF with the same weights ------------------------------------------------------


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("weights", ["gguf", "fp32"])
def test_gguf_file_gives_the_logits_of_the_hf_checkpoint_holding_the_same_dequantized_weights(
    qtype: str, weights: str, gguf_files: dict[str, str], gguf_dir: str, tiny_model_dir: str
) -> None:
    """weights="gguf" runs the quantized blocks through the q8_0/q4_0/q4_1 kernels;
    weights="fp32" dequantizes them on load. Either way the result is the HF model whose
    matrices were replaced by what the GGUF holds; only float32 summation order differs."""
    twin = os.path.join(gguf_dir, f"hf-twin-{qtype}-{weights}")
    write_hf_twin(twin, tiny_model_dir, Q[qtype])
    from_gguf = logits_of(gguf_files[qtype], weights)
    from_hf = logits_of(twin, "fp32")
    np.testing.assert_allclose(from_gguf, from_hf, rtol=1e-4, atol=1e-4)


def test_gguf_with_weights_gguf_keeps_quantized_blocks_in_memory(gguf_files: dict[str, str]) -> None:
    loaded = load_checkpoint(gguf_files["Q4_1"], "gguf")
    layer = loaded.weights.layers[0]
    assert isinstance(layer.w_qkv, QuantizedWeight) and layer.w_qkv.format == "q4_1"
    assert layer.w_qkv.shape == ((NUM_HEADS + 2 * NUM_KV_HEADS) * 16, 64)
    assert isinstance(loaded.weights.lm_head, QuantizedWeight)  # tied: the quantized embedding
    assert loaded.weights.embed is loaded.weights.lm_head and loaded.weights.embed.format == "q4_1"  # one table, kept quantized


def test_gguf_config_comes_from_metadata_and_ties_the_lm_head(gguf_files: dict[str, str], tiny_loaded) -> None:
    loaded = load_checkpoint(gguf_files["F32"])
    c = loaded.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (2, 64, 128)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (NUM_HEADS, NUM_KV_HEADS, 16)
    assert c.max_position_embeddings == 128 and c.rope_theta == 10000.0 and c.rms_norm_eps == pytest.approx(1e-5)
    assert c.vocab_size == tiny_loaded.config.vocab_size and c.tie_word_embeddings
    assert loaded.name == "tiny-F32"


def test_gguf_tokenizer_encodes_like_the_tokenizer_json_it_was_written_from(gguf_files: dict[str, str], tiny_loaded) -> None:
    tok = load_checkpoint(gguf_files["F32"]).tokenizer
    assert isinstance(tok, Tokenizer)
    for text in ["Hello world! The quick brown fox.", "def add(a, b):\n    return a + b", "café 日本語 😀", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == tiny_loaded.tokenizer.encode(text)
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.eos_token_ids == {tok.backend.token_to_id("<|im_end|>")}
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- every in-memory weight format ---------------------------------------------------------

# Relative RMS error of the logits against fp32, measured on the tiny model then given about
# 2x headroom. A random 2-layer model amplifies weight noise 3-4x: per-weight errors of about
# 0.03% (fp16), 0.5% (int8, Q8_0) and 10% (int4) show as 0.08%, 2% and 36% in the logits.
FORMAT_TOLERANCE = {
    "fp32": 1e-6, "fp16": 2e-3, "int8": 0.05, "int4": 0.75, "q8_0": 0.05, "q4_0": 0.75, "q4_1": 0.75, "gguf": 0.05,
}


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4", "q8_0", "q4_0", "q4_1", "gguf"])
def test_every_weight_format_gives_logits_close_to_fp32(fmt: str, tiny_model_dir: str, gguf_files: dict[str, str], fp32_logits: np.ndarray) -> None:
    # "gguf" keeps a file's blocks: it is exercised on the Q8_0 file of the same weights
    path = gguf_files["Q8_0"] if fmt == "gguf" else tiny_model_dir
    logits = logits_of(path, fmt)
    assert logits.shape == fp32_logits.shape and logits.dtype == np.float32
    rel_rms = np.linalg.norm(logits - fp32_logits) / np.linalg.norm(fp32_logits)
    assert rel_rms <= FORMAT_TOLERANCE[fmt]
    if fmt not in ("int4", "q4_0", "q4_1"):  # 8 bits and more keep (nearly) every greedy choice
        assert np.mean(logits.argmax(-1) == fp32_logits.argmax(-1)) >= 7 / 9


# --- errors ------------------------------------------------------------------------------------


def test_missing_gguf_file_raises_model_load_error_naming_it(tmp_path) -> None:
    path = str(tmp_path / "absent.gguf")
    with pytest.raises(ModelLoadError, match="absent.gguf"):
        load_checkpoint(path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_gguf(path)


@pytest.mark.parametrize("damage", ["first half", "all but the last 100 bytes", "random bytes", "empty"])
def test_truncated_or_corrupt_gguf_raises_model_load_error_with_the_path(damage: str, gguf_files: dict[str, str], tmp_path) -> None:
    with open(gguf_files["Q8_0"], "rb") as f:
        good = f.read()
    bad = {
        "first half": good[: len(good) // 2],
        "all but the last 100 bytes": good[:-100],
        "random bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty": b"",
    }[damage]
    path = str(tmp_path / "broken.gguf")
    with open(path, "wb") as f:
        f.write(bad)
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(path)
    assert path in str(info.value)
    assert not isinstance(info.value, UnsupportedModelError)


def test_gguf_of_an_unsupported_architecture_raises_unsupported_model_error(tiny_model_dir: str, tmp_path) -> None:
    path = write_gguf(str(tmp_path / "gpt2.gguf"), tiny_model_dir, Q.F32, arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_checkpoint(path)


@pytest.mark.parametrize(("tensor", "qtype"), [("blk.1.ffn_down.weight", Q.Q5_0), ("blk.0.attn_v.weight", Q.BF16)])
def test_gguf_tensor_of_an_unsupported_type_raises_unsupported_model_error_naming_it(
    tensor: str, qtype: GGMLQuantizationType, tiny_model_dir: str, tmp_path
) -> None:
    path = write_gguf(str(tmp_path / "odd.gguf"), tiny_model_dir, Q.Q8_0, overrides={tensor: qtype})
    with pytest.raises(UnsupportedModelError) as info:
        load_checkpoint(path)
    assert tensor in str(info.value) and qtype.name in str(info.value)


def test_hf_directory_without_config_json_raises_model_load_error(tiny_model_dir: str, tmp_path) -> None:
    path = str(tmp_path / "no-config")
    shutil.copytree(tiny_model_dir, path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_checkpoint(path)


def test_hf_directory_without_safetensors_raises_model_load_error(tiny_model_dir: str, tmp_path) -> None:
    path = str(tmp_path / "no-weights")
    shutil.copytree(tiny_model_dir, path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_checkpoint(path)


def test_unknown_weight_format_raises_unsupported_model_error(tiny_model_dir: str) -> None:
    with pytest.raises(UnsupportedModelError, match="q3"):
        load_checkpoint(tiny_model_dir, "q3")
