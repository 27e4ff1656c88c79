"""The tokenizer: ids and chat prompts identical to HF transformers on the real model,
streaming detokenization that never emits a broken character and loses nothing, and the
byte-level alphabet that turns a token back into its raw bytes.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoserve.tokenizer import IncrementalDetokenizer, Tokenizer, bytes_to_unicode, token_bytes

CORPUS = [
    "Hello, world!",
    "The capital of France is Paris.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "    leading spaces, trailing spaces    ",
    "tabs\tand\t\tmore tabs\nnew\n\n\nlines\r\nwindows",
    "a  b   c    d",
    "Emoji: 😀🎉👍🏽 family: 👨‍👩‍👧‍👦",
    "日本語のテキストと中文文本，还有한국어.",
    "café naïve façade Ångström über résumé",
    "Digits: 0 1 12 123 1234 12345 3.14159 1e-10 -42 2024-06-01",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "inline <|im_end|> special token and <|endoftext|> too",
    "Ünïcödé ✓ ∑ ∞ ≠ → ★ ♫",
    "",
    " ",
    "\n",
    "x" * 200,
    "I'm you're we've they'll she'd it's",
    "https://example.com/path?query=1&other=two#frag",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "Réponds en français. 日本語もOK 😀"},
        {"role": "user", "content": "Bonjour\n\nComment ça va?"},
        {"role": "assistant", "content": "Très bien, merci !"},
        {"role": "user", "content": "<code>x = 1</code>"},
    ],
]


def stream(tokenizer: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None) -> tuple[list[str], str]:
    """Feed ids one at a time; returns the deltas and what flush() released."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.add(t) for t in ids]
    return deltas, detok.flush()


def assert_streams_cleanly(tokenizer: Tokenizer, ids: list[int]) -> None:
    deltas, tail = stream(tokenizer, ids)
    full = tokenizer.decode(ids)
    assert "".join(deltas) + tail == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas) and "\ufffd" not in tail


# --- the real model against HF transformers -------------------------------------------------


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_path: str):
    """transformers' own tokenizer, built from the same GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))


@pytest.mark.real_model
def test_smollm2_encodes_like_transformers_and_decodes_losslessly(smollm2_loaded, hf_tokenizer) -> None:
    tok = smollm2_loaded.tokenizer
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.real_model
def test_smollm2_special_tokens_written_inline_become_single_ids(smollm2_loaded, hf_tokenizer) -> None:
    tok = smollm2_loaded.tokenizer
    for special in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]:
        (token_id,) = tok.encode(special)
        assert token_id == hf_tokenizer.convert_tokens_to_ids(special)
        assert tok.decode([token_id]) == ""  # skipped by default, as in streamed output
    assert tok.eos_token_ids == {hf_tokenizer.eos_token_id}


@pytest.mark.real_model
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system+user", "multi-turn", "system+unicode"])
def test_smollm2_chat_template_renders_like_transformers(conversation, smollm2_loaded, hf_tokenizer) -> None:
    ours = smollm2_loaded.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    theirs = hf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ours == theirs


@pytest.mark.real_model
def test_smollm2_streams_emoji_and_cjk_without_broken_characters(smollm2_loaded) -> None:
    tok = smollm2_loaded.tokenizer
    for text in CORPUS:
        assert_streams_cleanly(tok, tok.encode(text))


# --- the incremental detokenizer on the tiny model -----------------------------------------

TEXT_ALPHABET = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),  # ASCII
    st.sampled_from(list("\n\t éèüßñçÅø")),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x4FFF),  # CJK
    st.characters(min_codepoint=0x1F600, max_codepoint=0x1F64F),  # emoji (4 bytes)
    st.sampled_from(["<|im_start|>", "<|im_end|>"]),
)


@pytest.fixture(scope="module")
def tiny_tok(tiny_loaded) -> Tokenizer:
    return tiny_loaded.tokenizer


@pytest.fixture(scope="module")
def partial_token_ids(tiny_tok: Tokenizer) -> list[int]:
    """Tokens that hold an incomplete UTF-8 character on their own."""
    return [i for i in range(tiny_tok.vocab_size) if "\ufffd" in tiny_tok.decode([i])]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(TEXT_ALPHABET, max_size=30))
def test_streaming_encoded_text_emits_whole_characters_and_loses_nothing(tiny_tok: Tokenizer, pieces: list[str]) -> None:
    text = "".join(pieces)
    ids = tiny_tok.encode(text)
    deltas, tail = stream(tiny_tok, ids)
    assert "".join(deltas) + tail == tiny_tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert tail == ""  # valid text: nothing was left held back


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streaming_arbitrary_token_ids_concatenates_to_the_full_decode(
    tiny_tok: Tokenizer, partial_token_ids: list[int], data: st.DataObject
) -> None:
    """Any id sequence, biased towards tokens holding partial characters (what a sampler can emit)."""
    token = st.one_of(st.sampled_from(partial_token_ids), st.integers(0, tiny_tok.vocab_size - 1))
    ids = data.draw(st.lists(token, min_size=1, max_size=16))
    assert_streams_cleanly(tiny_tok, ids)


def test_partial_characters_are_held_back_until_complete(tiny_tok: Tokenizer, partial_token_ids: list[int]) -> None:
    assert partial_token_ids, "the tiny vocabulary should split some characters across tokens"
    ids = tiny_tok.encode("ab😀c")
    deltas, tail = stream(tiny_tok, ids)
    assert "".join(deltas) == "ab😀c" and tail == ""
    assert "😀" in deltas  # the emoji arrives whole, in one delta


@pytest.mark.parametrize("text", CORPUS)
def test_streaming_real_text_on_the_tiny_tokenizer_emits_no_broken_characters(tiny_tok: Tokenizer, text: str) -> None:
    ids = tiny_tok.encode(text)
    assert tiny_tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert_streams_cleanly(tiny_tok, ids)


def test_streaming_after_a_prompt_emits_only_the_generated_text(tiny_tok: Tokenizer) -> None:
    prompt = tiny_tok.encode("The quick brown fox jumps over the lazy dog. 日本")
    generated = tiny_tok.encode(" says 😀 hello")
    deltas, tail = stream(tiny_tok, generated, prompt_ids=prompt)
    assert "".join(deltas) + tail == " says 😀 hello"


def test_flush_releases_an_incomplete_tail(tiny_tok: Tokenizer) -> None:
    ids = tiny_tok.encode("ok 🎉")  # not in the tiny model's training text: spelled in byte tokens
    cut = ids[:-1]  # the emoji's last byte never comes
    deltas, tail = stream(tiny_tok, cut)
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) + tail == tiny_tok.decode(cut)
    assert tail.endswith("\ufffd")


# --- the byte-level alphabet ------------------------------------------------------------------


def test_the_byte_level_alphabet_spells_each_byte_with_its_own_character() -> None:
    alphabet = bytes_to_unicode()
    assert list(alphabet) == list(range(256))
    assert len(set(alphabet.values())) == 256
    assert alphabet[ord("a")] == "a" and alphabet[ord("é".encode("latin-1"))] == "é"
    assert alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ"  # GPT-2's spellings


def test_token_bytes_reads_byte_level_pieces_and_encodes_other_text() -> None:
    assert token_bytes("Ġhello") == b" hello"
    assert token_bytes("".join(bytes_to_unicode()[b] for b in "😀".encode())) == "😀".encode()
    assert token_bytes("<|im_end|>") == b"<|im_end|>"
    assert token_bytes("日本") == "日本".encode()  # not in the alphabet: plain UTF-8
    assert token_bytes("") == b""


@pytest.mark.parametrize("text", CORPUS)
def test_the_bytes_of_a_texts_tokens_join_into_the_text(tiny_tok: Tokenizer, text: str) -> None:
    pieces = [tiny_tok.backend.id_to_token(t) for t in tiny_tok.encode(text)]
    assert b"".join(token_bytes(p) for p in pieces) == text.encode()
