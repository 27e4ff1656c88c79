"""Text <-> token ids: HF ``tokenizers`` built from GGUF metadata or ``tokenizer.json``,
the model's chat template rendered with Jinja2, and a streaming-safe detokenizer.

A byte-level BPE vocabulary spells every token in a 256-character alphabet that stands
for raw bytes, so one token can end in the middle of a multi-byte UTF-8 character.
:class:`IncrementalDetokenizer` therefore holds text back until it decodes cleanly:
streamed text never contains a broken character. :func:`token_bytes` turns a vocabulary
entry back into the raw bytes it spells (what logprobs' ``bytes`` field reports).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

from nanoserve.errors import ModelLoadError, UnsupportedModelError

CONTROL_TOKEN_TYPE = 3  # llama.cpp's token type for special tokens like <|im_end|>


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the character that spells each of the 256 bytes.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) spell themselves; the
    other 68 (space, control bytes, ...) take the characters from U+0100 on, in byte order,
    so a space is ``Ġ`` (U+0120) and a newline ``Ċ`` (U+010A).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    alphabet = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in alphabet]
    alphabet.update({b: chr(256 + i) for i, b in enumerate(others)})
    return dict(sorted(alphabet.items()))


_BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(piece: str) -> bytes:
    """The raw bytes a vocabulary entry (``backend.id_to_token(id)``) stands for.

    A byte-level BPE piece, every character of which is in :func:`bytes_to_unicode`'s
    alphabet, is one byte per character (``"Ġhi"`` -> ``b" hi"``); any other piece (an
    added token spelled in plain text) is its UTF-8 encoding. The bytes of a single token
    may end inside a multi-byte character.
    """
    if all(char in _BYTE_OF_CHAR for char in piece):
        return bytes(_BYTE_OF_CHAR[char] for char in piece)
    return piece.encode("utf-8")


class Tokenizer:
    """Encode, decode, chat-format. ``eos_token_ids`` end generation by default."""

    def __init__(
        self,
        backend: Any,  # tokenizers.Tokenizer
        eos_token_ids: set[int],
        bos_token_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        special_tokens: dict[str, str],
    ) -> None:
        self.backend = backend
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special_tokens = special_tokens  # e.g. {"bos_token": "<|im_start|>", "eos_token": ...}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Byte-level BPE ("gpt2" in GGUF) from ``tokenizer.ggml.*`` keys."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported; nanoserve reads 'gpt2' (byte-level BPE)")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        tok = HFTokenizer(bpe)
        split_digits = [pre_tokenizers.Digits(individual_digits=True)] if meta.get("tokenizer.ggml.pre") == "smollm" else []
        if meta.get("tokenizer.ggml.pre") in ("llama3", "llama-bpe", "llama-v3"):
            pattern = (
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            )
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        else:  # GPT-2's split regex; "smollm" also puts every digit on its own
            tok.pre_tokenizer = pre_tokenizers.Sequence(split_digits + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        types = list(meta.get("tokenizer.ggml.token_type", []))
        control = [t for t, ty in zip(tokens, types) if ty == CONTROL_TOKEN_TYPE]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

        def token(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None else None

        eos = {t for t in (token("eos_token_id"), token("eot_token_id")) if t is not None}
        bos = token("bos_token_id")
        specials = {"bos_token": tokens[bos] if bos is not None else "", "eos_token": tokens[token("eos_token_id") or 0]}
        return cls(tok, eos, bos, bool(meta.get("tokenizer.ggml.add_bos_token", False)), meta.get("tokenizer.chat_template"), specials)

    @classmethod
    def from_hf_dir(cls, path: str) -> Tokenizer:
        """From ``tokenizer.json`` (+ ``tokenizer_config.json``, ``generation_config.json``)."""
        from tokenizers import Tokenizer as HFTokenizer

        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise ModelLoadError(f"{path!r} has no tokenizer.json")
        tok = HFTokenizer.from_file(tj)
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen = _read_json(os.path.join(path, "generation_config.json"))

        def content(v: Any) -> str | None:
            return v.get("content") if isinstance(v, dict) else v

        eos_text, bos_text = content(cfg.get("eos_token")), content(cfg.get("bos_token"))
        eos: set[int] = set()
        if eos_text and tok.token_to_id(eos_text) is not None:
            eos.add(tok.token_to_id(eos_text))
        gen_eos = gen.get("eos_token_id")
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        bos = tok.token_to_id(bos_text) if bos_text else None
        specials = {"bos_token": bos_text or "", "eos_token": eos_text or ""}
        return cls(tok, eos, bos, bool(cfg.get("add_bos_token", False)), cfg.get("chat_template"), specials)

    # --- use ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text become their ids."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render the model's Jinja2 chat template (as HF transformers does)."""
        if not self.chat_template:
            raise UnsupportedModelError("this model has no chat template; use a raw prompt instead")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


_TEMPLATES: dict[str, Any] = {}


def _compile_template(source: str) -> Any:
    if source not in _TEMPLATES:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text deltas that never split a character.

    Decoding token by token is wrong for byte-level BPE (a token may hold half of a UTF-8
    character, and some tokenizers change spacing by context), so each step decodes a
    short window: ``prefix_offset`` .. end, minus the text of ``prefix_offset`` ..
    ``read_offset`` already emitted. If the new text ends in U+FFFD (an incomplete
    character), nothing is emitted yet; the bytes complete on a later token.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-6:]) if prompt_ids else []
        self.prefix_offset = len(self.ids)
        self.read_offset = len(self.ids)
        self.skip_special_tokens = skip_special_tokens
        self.text = ""  # everything emitted so far

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a stream: emit whatever is held back (even a broken tail)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        delta = full[len(prefix) :] if full.startswith(prefix) else ""
        self.read_offset = self.prefix_offset = len(self.ids)
        self.text += delta
        return delta
