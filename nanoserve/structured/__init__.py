"""Structured output: constrained decoding with a token-level automaton, and jump-forward.

A request with ``SamplingParams(regex=...)``, ``json_schema=...`` or ``choice=[...]`` only
ever produces text that fully matches its constraint, and ends with EOS only where the
text is complete. The data flow, and who owns each step::

    SamplingParams.validate()   constraint -> regex (schema.py) -> byte DFA (fsm.py)
                                [interegular builds the character DFA; cached by regex]
    prepare(params, tokenizer)  byte DFA x vocabulary -> TokenIndex (index.py)
                                [nanoserve's own, vectorised; cached by (regex, tokenizer)]
    Sampler.process()           each row's state = walk(history) (guide.py); forbidden
                                logits -> -inf, after the logits processors and before
                                penalties, temperature, top-k, top-p and min-p
    Sampler.sample()            the sampled token, then any forced tokens (jump-forward)
    valid_draft_prefix()        speculative drafts cut at the first one the automaton rejects

Errors are :class:`~nanoserve.errors.InvalidSamplingParams` naming the field (``regex``,
``json_schema``, ``choice``, ``max_tokens``): an invalid regex, an unsupported schema
keyword, a constraint nothing satisfies, one that cannot finish within ``max_tokens``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from nanoserve.errors import InvalidSamplingParams
from nanoserve.structured.fsm import DEAD, ByteDFA, compile_regex
from nanoserve.structured.guide import RequestGuide, guide_for
from nanoserve.structured.index import TokenIndex, Vocabulary, build_index, vocabulary_of
from nanoserve.structured.schema import JSON_OBJECT_REGEX, choice_regex, schema_regex

if TYPE_CHECKING:
    from nanoserve.request import Request
    from nanoserve.sampling import SamplingParams

__all__ = [
    "DEAD",
    "JSON_OBJECT_REGEX",
    "ByteDFA",
    "RequestGuide",
    "TokenIndex",
    "Vocabulary",
    "compile_constraint",
    "constraint_regex",
    "guide_of",
    "prepare",
    "valid_draft_prefix",
]

CACHE_SIZE = 64  # compiled constraints kept, least recently used dropped first
_DFAS: OrderedDict[str, ByteDFA] = OrderedDict()
_INDEXES: OrderedDict[tuple[str, int, bool], tuple[Any, TokenIndex]] = OrderedDict()  # key -> (vocab, index)
_SCHEMA_REGEXES: OrderedDict[str, str] = OrderedDict()


def _remember(cache: OrderedDict, key: Any, value: Any) -> Any:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    return value


def constraint_regex(params: SamplingParams) -> tuple[str, str] | None:
    """``(field, regex)`` of the request's constraint, or None if it has none."""
    if params.regex is not None:
        return "regex", params.regex
    if params.choice is not None:
        return "choice", choice_regex(params.choice)
    if params.json_schema is not None:
        key = params.json_schema if isinstance(params.json_schema, str) else json.dumps(params.json_schema, sort_keys=True)
        if key not in _SCHEMA_REGEXES:
            _remember(_SCHEMA_REGEXES, key, schema_regex(params.json_schema))
        _SCHEMA_REGEXES.move_to_end(key)
        return "json_schema", _SCHEMA_REGEXES[key]
    return None


def compile_constraint(field: str, regex: str) -> ByteDFA:
    """The byte DFA of ``regex`` (cached); InvalidSamplingParams naming ``field`` if refused."""
    if regex not in _DFAS:
        _remember(_DFAS, regex, compile_regex(regex, field))
    _DFAS.move_to_end(regex)
    return _DFAS[regex]


def index_for(regex: str, field: str, vocab: Vocabulary, canonical_runs: bool = True) -> TokenIndex:
    """The token index of ``regex`` over ``vocab`` (cached by regex and vocabulary)."""
    key = (regex, id(vocab), canonical_runs)
    hit = _INDEXES.get(key)
    if hit is not None and hit[0] is vocab:
        _INDEXES.move_to_end(key)
        return hit[1]
    index = build_index(compile_constraint(field, regex), vocab, canonical_runs)
    _remember(_INDEXES, key, (vocab, index))
    return index


def prepare(params: SamplingParams, tokenizer: Any, check_budget: bool = True) -> TokenIndex | None:
    """Compile the request's constraint for ``tokenizer`` and check it can be met; None if unconstrained.

    Raises InvalidSamplingParams if no token sequence of this vocabulary satisfies it, or
    (``check_budget``) if the shortest one is longer than ``max_tokens``. The index is kept
    on ``params`` (``params._index``), so the sampler finds it without the tokenizer.
    """
    found = constraint_regex(params)
    if found is None:
        return None
    field, regex = found
    index = index_for(regex, field, vocabulary_of(tokenizer))
    if index.num_states == 0:
        raise InvalidSamplingParams(
            f"invalid {field}={_short(getattr(params, field))}: no sequence of this model's tokens matches it "
            "(the constraint is unsatisfiable)"
        )
    if check_budget and index.dist[index.initial] > params.max_tokens:
        raise InvalidSamplingParams(
            f"invalid max_tokens={params.max_tokens}: the shortest answer that satisfies the {field} takes "
            f"{int(index.dist[index.initial])} tokens; raise max_tokens to at least that"
        )
    params._index = index  # type: ignore[attr-defined]
    return index


def guide_of(request: Request) -> RequestGuide | None:
    """The request's :class:`RequestGuide`, or None if it is unconstrained.

    The index comes from ``prepare`` (which the engine should call when the request is
    added); failing that, from the tokenizer of the request's text stream.
    """
    params = request.params
    if not params.constrained:
        return None
    index = getattr(params, "_index", None)
    if index is None:
        detok = getattr(request.text, "detok", None)
        tokenizer = getattr(detok, "tokenizer", None)
        if tokenizer is None:
            raise InvalidSamplingParams(
                f"request {request.request_id!r} has a constraint but no tokenizer to compile it with; "
                "call nanoserve.structured.prepare(params, tokenizer) before adding it"
            )
        # in the middle of a step an error would fail the whole batch: an answer that cannot
        # finish in time is cut at max_tokens instead (prepare() on add refuses it)
        index = prepare(params, tokenizer, check_budget=False)
    return guide_for(request, index)


def valid_draft_prefix(request: Request, drafts: list[int]) -> int:
    """How many leading ``drafts`` (proposed after all of the request's outputs) its constraint allows.

    A speculator keeps ``drafts[:valid_draft_prefix(request, drafts)]``: a draft after the first
    rejected one could never be accepted (its target probability is 0), so verifying it would
    only waste a position. Unconstrained requests keep all their drafts.
    """
    guide = guide_of(request)
    return len(drafts) if guide is None else guide.valid_prefix(request, drafts)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return repr(text if len(text) <= 80 else text[:77] + "...")
