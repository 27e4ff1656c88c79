"""Structured output, as a specification: the automaton, the token index, the mask, jump-forward.

The index is checked against outlines-core's own on the same regex and vocabulary; the
engine's constrained greedy output against a slow reference that tries every token with
interegular's character automaton; jump-forward on and off against each other.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("interegular")  # the regex -> DFA library (a dependency of structured output)

from nanoserve import structured  # noqa: E402
from nanoserve.engine import LLMEngine  # noqa: E402
from nanoserve.errors import InvalidSamplingParams  # noqa: E402
from nanoserve.llm import LLM  # noqa: E402
from nanoserve.sampling import SamplingParams  # noqa: E402
from nanoserve.structured.fsm import DEAD, compile_regex  # noqa: E402
from nanoserve.structured.index import build_index, vocabulary_of  # noqa: E402

REGEXES = [
    r"[0-9]{3}-[a-z]+",
    r"(yes|no|maybe)",
    r"caf(é|e) na[ïi]ve",
    r"[^a-z]{1,4}x",  # a negated class: a million code points, tokens cut inside characters
    r"(日本|😀)+!?",
    r'"([^"\\]|\\["\\/bfnrt])*"',
    r"The (quick|lazy) [a-z]+\.",  # a token may straddle the end of the match ("." + more)
]
ALPHABET = list("abcxyz019-.!é日本😀\"\\ ") + ["\u00ef", "\x00", "\U0010ffff", "\ue000"]


@pytest.fixture(scope="module")
def tiny_engine(tiny_loaded):
    return LLMEngine(loaded=tiny_loaded, num_blocks=256)


@pytest.fixture(scope="module")
def tiny_vocab(tiny_loaded):
    return vocabulary_of(tiny_loaded.tokenizer)


# --- the byte DFA ---------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", REGEXES)
@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=8))
def test_byte_dfa_accepts_exactly_the_utf8_of_full_matches(pattern, text):
    dfa = compile_regex(pattern)
    assert dfa.accepts(text.encode()) == bool(re.fullmatch(pattern, text))


def test_byte_dfa_shares_the_states_inside_a_character():
    dfa = compile_regex(r"[^\"]*")  # every character but one: 1 character state, a few inside
    assert dfa.num_char_states == 1 and dfa.num_states < 12


# --- the token index against outlines-core ----------------------------------------------------
def outlines_transitions(pattern: str, vocab) -> tuple[int, dict[int, dict[int, int]], set[int]]:
    outlines_core = pytest.importorskip("outlines_core")
    eos = vocab.size  # an id no token has
    table: dict[bytes, list[int]] = {}
    for i, piece in enumerate(vocab.token_bytes):
        if piece:
            table.setdefault(piece, []).append(i)
    index = outlines_core.Index(pattern, outlines_core.Vocabulary(eos, table))
    transitions = {s: {t: n for t, n in moves.items() if t != eos} for s, moves in index.get_transitions().items()}
    return index.get_initial_state(), transitions, set(index.get_final_states())


def assert_same_index(ours, pattern: str, vocab) -> None:
    """Walk both indexes from the start in lockstep (a bisimulation: outlines-core's DFA is not
    minimised, so one of our states may pair with several of its): each pair allows the same
    tokens and agrees on accepting.

    One known difference: in an *accepting* state outlines-core (0.2.14) leaves out tokens that
    are a lone UTF-8 lead byte (b"\\xe6", the first byte of 日), though it allows them in other
    states and allows the two-byte b"\\xe6\\x97" there. Such a token does begin the next
    character legally, so nanoserve keeps it; the comparison allows exactly that difference."""
    initial, theirs, their_finals = outlines_transitions(pattern, vocab)
    seen = {(ours.initial, initial)}
    todo = list(seen)
    while todo:
        s, o = todo.pop()
        tokens, nxt = ours.allowed(s)
        moves = theirs.get(o, {})
        assert bool(ours.finals[s]) == (o in their_finals)
        extra = set(tokens.tolist()) - set(moves)
        assert set(moves) <= set(tokens.tolist()), f"state {s}: outlines-core allows tokens we do not"
        lone_leads = {t for t in extra if len(vocab.token_bytes[t]) == 1 and vocab.token_bytes[t][0] >= 0xC2}
        assert extra == (lone_leads if ours.finals[s] else set()), f"state {s}: we allow tokens outlines-core does not"
        for pair in ((n, moves[t]) for t, n in zip(tokens.tolist(), nxt.tolist()) if t in moves):
            if pair not in seen:
                seen.add(pair)
                todo.append(pair)


@pytest.mark.parametrize("pattern", REGEXES)
def test_token_index_equals_outlines_core_on_the_tiny_vocabulary(pattern, tiny_vocab):
    index = build_index(compile_regex(pattern), tiny_vocab, canonical_runs=False)
    index.check_invariants()
    assert_same_index(index, pattern, tiny_vocab)


@pytest.mark.real_model
@pytest.mark.parametrize("pattern", [*REGEXES, structured.JSON_OBJECT_REGEX])
def test_token_index_equals_outlines_core_on_smollm2(pattern, smollm2_loaded):
    vocab = vocabulary_of(smollm2_loaded.tokenizer)
    index = build_index(compile_regex(pattern), vocab, canonical_runs=False)
    assert_same_index(index, pattern, vocab)


def test_canonical_runs_allow_one_token_inside_a_run_and_keep_the_tokens_that_cross_it(tiny_vocab):
    plain = build_index(compile_regex(r"The (quick|lazy) dog"), tiny_vocab, canonical_runs=False)
    runs = build_index(compile_regex(r"The (quick|lazy) dog"), tiny_vocab)
    runs.check_invariants()
    assert runs.runs[runs.initial] == b"The "
    tokens, _ = runs.allowed(runs.initial)
    plain_tokens, _ = plain.allowed(plain.initial)
    assert set(tokens) < set(plain_tokens)
    inside = [t for t in tokens if len(tiny_vocab.token_bytes[t]) <= 4]
    assert len(inside) == 1 and b"The ".startswith(tiny_vocab.token_bytes[inside[0]])
    assert all(tiny_vocab.token_bytes[t].startswith(b"The ") for t in tokens if t not in inside)


# --- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(regex="a(b"), "regex"),
        (dict(regex="(?=a)b"), "lookaround"),
        (dict(regex="a", choice=["a"]), "at most one"),
        (dict(choice=[]), "choice"),
        (dict(choice=["a", ""]), "non-empty"),
        (dict(json_schema={"type": "integer", "minimum": 3}), "'minimum' at /minimum"),
        (dict(json_schema={"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}]}}}), "use anyOf"),
        (dict(json_schema={"type": "string", "format": "hostname"}), "format"),
        (dict(json_schema=False), "unsatisfiable"),
        (dict(json_schema="{not json"), "not valid JSON"),
        (dict(regex="a", ignore_eos=True), "ignore_eos"),
        (dict(regex="[a-z]&&[0-9]"), None),  # interegular reads && literally: a valid regex
    ],
)
def test_bad_constraints_are_one_line_errors_naming_the_field(kwargs, names):
    if names is None:
        SamplingParams(**kwargs)
        return
    with pytest.raises(InvalidSamplingParams, match=re.escape(names)) as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith("invalid ")


def test_prepare_refuses_a_constraint_that_cannot_finish_within_max_tokens(tiny_loaded):
    params = SamplingParams(regex="[0-9]{40}", max_tokens=8)
    with pytest.raises(InvalidSamplingParams, match=r"invalid max_tokens=8: .* takes \d+ tokens"):
        structured.prepare(params, tiny_loaded.tokenizer)
    assert structured.prepare(SamplingParams(regex="[0-9]{4}", max_tokens=8), tiny_loaded.tokenizer) is not None


def test_prepare_refuses_a_constraint_no_token_sequence_spells(tiny_loaded):
    params = SamplingParams(regex="\ud800", max_tokens=8)  # a lone surrogate: no UTF-8 spells it
    with pytest.raises(InvalidSamplingParams, match="unsatisfiable"):
        structured.prepare(params, tiny_loaded.tokenizer)


# --- the engine: outputs match -----------------------------------------------------------------
def generate(engine, prompts, **kwargs):
    outs = LLM(engine=engine).generate(prompts, SamplingParams(**kwargs), use_tqdm=False)
    engine.check_invariants()
    assert engine.stats().num_used_blocks == 0
    return outs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("pattern", REGEXES)
def test_every_output_fully_matches_its_regex(tiny_engine, pattern, temperature):
    outs = generate(tiny_engine, ["Hello world", "Paris is", "def add"], regex=pattern, temperature=temperature, seed=1, max_tokens=24)
    for out in outs:
        assert re.fullmatch(pattern, out.text), (pattern, out.text, out.finish_reason)


def test_a_batch_mixes_constrained_and_free_requests(tiny_engine):
    llm = LLM(engine=tiny_engine)
    free = SamplingParams(temperature=0, max_tokens=12, seed=0)
    alone = llm.generate(["Paris is"], free, use_tqdm=False)[0].token_ids
    mixed = llm.generate(["Paris is", "Paris is"], [free, SamplingParams(temperature=0, max_tokens=12, choice=["yes", "no"])], use_tqdm=False)
    assert mixed[0].token_ids == alone
    assert mixed[1].text in ("yes", "no") and mixed[1].finish_reason == "stop"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(
        st.sampled_from(["[a-z]", "[0-9]+", "(ab|cd)", "é", "x?", "[^0-9 ]", "( |-)", "日*", "\\.", "(no|nope)"]),
        min_size=1,
        max_size=5,
    ),
    temperature=st.sampled_from([0.0, 1.0]),
    seed=st.integers(0, 1000),
)
def test_outputs_match_hypothesis_generated_regexes(tiny_engine, pieces, temperature, seed):
    pattern = "".join(pieces)
    out = generate(tiny_engine, ["The quick"], regex=pattern, temperature=temperature, seed=seed, max_tokens=16)[0]
    assert re.fullmatch(pattern, out.text), (pattern, out.text)


@st.composite
def json_schemas(draw, depth: int = 0):
    leaf = st.sampled_from(
        [
            {"type": "integer"},
            {"type": "boolean"},
            {"type": "null"},
            {"type": "number"},
            {"type": "string", "maxLength": 6},
            {"enum": ["red", "green", 3]},
            {"const": "fixed"},
            {"type": "string", "pattern": "[a-z]{2}"},
        ]
    )
    if depth >= 2:
        return draw(leaf)
    kind = draw(st.sampled_from(["leaf", "object", "array", "anyOf"]))
    if kind == "leaf":
        return draw(leaf)
    if kind == "array":
        return {"type": "array", "items": draw(json_schemas(depth + 1)), "maxItems": 3}
    if kind == "anyOf":
        return {"anyOf": [draw(json_schemas(depth + 1)), draw(json_schemas(depth + 1))]}
    names = draw(st.lists(st.sampled_from(["id", "name", "ok", "x"]), min_size=1, max_size=3, unique=True))
    properties = {n: draw(json_schemas(depth + 1)) for n in names}
    return {"type": "object", "properties": properties, "required": names}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=json_schemas(), temperature=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 1000))
def test_outputs_validate_against_hypothesis_generated_schemas(tiny_engine, schema, temperature, seed):
    jsonschema = pytest.importorskip("jsonschema")
    out = generate(tiny_engine, ["Hello world"], json_schema=schema, temperature=temperature, seed=seed, max_tokens=80)[0]
    jsonschema.validate(json.loads(out.text), schema)


def test_json_object_mode_gives_a_json_object(tiny_engine):
    for seed in range(3):
        out = generate(tiny_engine, ["Hello"], json_schema={"type": "object"}, temperature=1.0, seed=seed, max_tokens=40)[0]
        assert isinstance(json.loads(out.text), dict)


def test_an_answer_always_ends_complete_within_max_tokens(tiny_engine, tiny_loaded):
    """The mask admits only tokens from which the answer can still finish in the tokens left."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
    shortest = int(structured.prepare(SamplingParams(json_schema=schema), tiny_loaded.tokenizer).dist[0])
    for max_tokens in (shortest, shortest + 1, shortest + 5):
        for seed in range(3):
            out = generate(tiny_engine, ["Hello"], json_schema=schema, temperature=1.0, seed=seed, max_tokens=max_tokens)[0]
            assert len(out.token_ids) <= max_tokens
            assert set(json.loads(out.text)) == {"a", "b"}


def test_constrained_requests_survive_preemption_and_the_prefix_cache(tiny_loaded):
    pattern = r"[a-z]( [a-z]){9}"
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, tiny_loaded.config.vocab_size, n).tolist() for n in (17, 9, 21, 13, 5)]
    alone = generate(LLMEngine(loaded=tiny_loaded, num_blocks=256), prompts, regex=pattern, temperature=0, max_tokens=20)
    tight = LLMEngine(loaded=tiny_loaded, num_blocks=14, block_size=4, prefix_cache="radix")
    squeezed = generate(tight, prompts, regex=pattern, temperature=0, max_tokens=20)
    assert tight.stats().num_preemptions > 0
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in alone]
    assert all(re.fullmatch(pattern, o.text) for o in squeezed)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_constrained_requests_stay_valid_with_speculative_decoding(tiny_loaded, tiny_model_dir, method):
    pattern = r"(abc|abd)( (abc|abd)){4}"
    # no jump-forward here: its forced tokens leave nothing to draft (a request drafts only while decoding)
    plain = generate(LLMEngine(loaded=tiny_loaded, num_blocks=256), ["abc abd abc abd"], regex=pattern, temperature=0, max_tokens=30, jump_forward=False)
    extra = {"draft_model": tiny_model_dir, "draft_weights": "fp32"} if method == "draft" else {"prompt_lookup_min": 1}
    spec = LLMEngine(loaded=tiny_loaded, num_blocks=256, speculative=method, num_speculative_tokens=3, **extra)
    propose, drafted = spec.speculator.propose, []

    def checked_propose(requests):  # every draft that reaches verification is one the constraint allows
        propose(requests)
        for r in requests:
            assert structured.valid_draft_prefix(r, r.spec_token_ids) == len(r.spec_token_ids)
            drafted.append(len(r.spec_token_ids))

    spec.speculator.propose = checked_propose
    outs = generate(spec, ["abc abd abc abd"], regex=pattern, temperature=0, max_tokens=30, jump_forward=False)
    assert outs[0].token_ids == plain[0].token_ids and re.fullmatch(pattern, outs[0].text)
    if method == "ngram":  # the draft model guesses without the constraint: most of its guesses are cut
        assert sum(drafted) > 0


def test_valid_draft_prefix_cuts_at_the_first_rejected_draft(tiny_engine, tiny_loaded):
    tok = tiny_loaded.tokenizer
    engine = tiny_engine
    engine.add_request("Hello", SamplingParams(regex="[0-9]+x", max_tokens=10), request_id="drafts")
    request = engine.requests["drafts"]
    one, x, a = tok.encode("1", False)[0], tok.encode("x", False)[0], tok.encode("a", False)[0]
    assert structured.valid_draft_prefix(request, [one, one, x, one]) == 3
    assert structured.valid_draft_prefix(request, [a, one]) == 0
    assert structured.valid_draft_prefix(request, [one] * 12) == 9  # the 10th token must be x
    engine.abort("drafts")
    engine.step()


# --- the mask against a slow reference ---------------------------------------------------------
class SlowReference:
    """Which tokens may follow a text, found by trying each token on interegular's character DFA."""

    def __init__(self, pattern: str, tokenizer) -> None:
        import interegular
        from interegular.fsm import anything_else

        self.fsm = interegular.parse_pattern(pattern).to_fsm()
        self.other = anything_else
        self.tokenizer = tokenizer
        self.vocab = vocabulary_of(tokenizer)
        self.live = self._live_states()

    def _live_states(self) -> set:
        live = set(self.fsm.finals)
        while True:
            more = {s for s, moves in self.fsm.map.items() if any(n in live for n in moves.values())} - live
            if not more:
                return live
            live |= more

    def _moves(self, state, lo: int, hi: int) -> list:
        """Live states reachable by one character in [lo, hi] from ``state``."""
        out = []
        listed = {ord(c): sym for c, sym in self.fsm.alphabet._symbol_mapping.items() if c is not self.other}
        other = self.fsm.alphabet._symbol_mapping.get(self.other)
        for symbol, nxt in self.fsm.map.get(state, {}).items():
            if nxt not in self.live:
                continue
            if symbol == other:
                if any(cp not in listed for cp in range(lo, min(hi, lo + len(listed) + 1) + 1)):
                    out.append(nxt)
            elif any(lo <= cp <= hi for cp, s in listed.items() if s == symbol):
                out.append(nxt)
        return out

    def viable(self, data: bytes) -> bool:
        """Whether ``data`` begins the UTF-8 of some full match."""
        for cut in range(len(data), max(-1, len(data) - 4), -1):
            try:
                text, tail = data[:cut].decode("utf-8"), data[cut:]
                break
            except UnicodeDecodeError:
                continue
        else:
            return False  # not UTF-8 even without its last three bytes
        state = self.fsm.initial
        for char in text:
            state = self.fsm.map.get(state, {}).get(self.fsm.alphabet[char])
            if state is None or state not in self.live:
                return False
        if not tail:
            return True
        lo, hi = utf8_prefix_range(tail)
        return lo <= hi and bool(self._moves(state, lo, hi))

    def forced_run(self, text: str) -> str:
        """The characters the DFA must read next after ``text`` (not final, one way on)."""
        state = self.fsm.initial
        for char in text:
            state = self.fsm.map[state][self.fsm.alphabet[char]]
        run = ""
        while state not in self.fsm.finals:
            moves = [(sym, n) for sym, n in self.fsm.map.get(state, {}).items() if n in self.live]
            chars = [c for c, s in self.fsm.alphabet._symbol_mapping.items() if moves and s == moves[0][0]]
            if len(moves) != 1 or len(chars) != 1 or chars[0] is self.other:
                break
            run += chars[0]
            state = moves[0][1]
        return run

    def allowed(self, data: bytes) -> set[int]:
        ok = {t for t, piece in enumerate(self.vocab.token_bytes) if piece and self.viable(data + piece)}
        try:
            run = self.forced_run(data.decode("utf-8"))
        except (UnicodeDecodeError, KeyError):
            run = ""
        if run:
            first = self.tokenizer.encode(run, add_special_tokens=False)[0]
            ok = {t for t in ok if t == first or len(self.vocab.token_bytes[t]) > len(run.encode())}
        if self.viable(data) and self._is_full(data):
            ok |= self.vocab.eos_token_ids
        return ok

    def _is_full(self, data: bytes) -> bool:
        try:
            return self.fsm.accepts(data.decode("utf-8"))
        except UnicodeDecodeError:
            return False


def utf8_prefix_range(tail: bytes) -> tuple[int, int]:
    """The code points whose UTF-8 starts with the incomplete ``tail``."""
    lead = tail[0]
    length = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 0
    if not length or len(tail) >= length or any(b >> 6 != 0b10 for b in tail[1:]):
        return 1, 0
    value = lead & (0x7F >> length)
    for b in tail[1:]:
        value = value << 6 | (b & 0x3F)
    free = 6 * (length - len(tail))
    lo, hi = value << free, (value << free) | ((1 << free) - 1)
    lo = max(lo, {2: 0x80, 3: 0x800, 4: 0x10000}[length])
    return lo, min(hi, 0x10FFFF)


@pytest.mark.parametrize("pattern", [r"[0-9]{2}-(ab|cd)[a-z]*", r"caf(é|e) [^a-z]{1,3}", r"The (quick|lazy) [a-z]+\."])
def test_greedy_constrained_output_is_the_argmax_over_the_allowed_set_at_every_step(tiny_engine, tiny_loaded, pattern):
    seen: list[np.ndarray] = []

    def record(history: list[int], logits: np.ndarray) -> np.ndarray:
        seen.append(logits.copy())
        return logits

    max_tokens = 28
    out = generate(tiny_engine, ["Hello world"], regex=pattern, temperature=0, max_tokens=max_tokens, logits_processors=[record])[0]
    index = structured.index_for(structured.constraint_regex(SamplingParams(regex=pattern))[1], "regex", vocabulary_of(tiny_loaded.tokenizer))
    assert index.max_next_dist.max() < 10, "the budget rule must not bind on the rows compared"
    ref = SlowReference(pattern, tiny_loaded.tokenizer)
    vocab = ref.vocab
    data = b""
    for step, (token, logits) in enumerate(zip(out.token_ids, seen)):
        if max_tokens - step <= 10:
            break
        allowed = sorted(ref.allowed(data))
        assert allowed, f"step {step}: the reference allows nothing after {data!r}"
        best = allowed[int(np.argmax(logits[allowed]))]
        assert token == best, f"step {step}: got {token}, the argmax over the allowed set is {best} (after {data!r})"
        data += vocab.token_bytes[token]
    assert re.fullmatch(pattern, out.text)


# --- jump-forward --------------------------------------------------------------------------------
JF_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "count": {"type": "integer"}}, "required": ["name", "count"]}


@pytest.mark.parametrize("kwargs", [dict(json_schema=JF_SCHEMA), dict(choice=["The quick brown fox", "The lazy dog"]), dict(regex=r"Answer: (yes|no)\.")])
def test_jump_forward_gives_the_same_tokens_in_fewer_steps(tiny_loaded, kwargs):
    results = {}
    for jf in (True, False):
        engine = LLMEngine(loaded=tiny_loaded, num_blocks=256)
        for temperature in (0.0, 1.0):
            outs = generate(engine, ["Hello world", "Paris is"], temperature=temperature, seed=7, max_tokens=48, jump_forward=jf, **kwargs)
            results[jf, temperature] = [o.token_ids for o in outs]
        results[jf, "steps"] = engine.stats().num_steps
    assert results[True, 0.0] == results[False, 0.0]
    assert results[True, 1.0] == results[False, 1.0]  # the random stream is kept aligned too
    assert results[True, "steps"] < results[False, "steps"]


def test_jump_forward_keeps_the_output_distribution(tiny_loaded):
    """Two-sample chi-square: jump-forward on (seeds 0..N) against off (seeds N..2N)."""
    choices = ["The quick brown fox", "The lazy dog", "Hello world", "Hello"]
    n = 150
    counts = {True: {}, False: {}}
    for jf in (True, False):
        engine = LLMEngine(loaded=tiny_loaded, num_blocks=512)
        seeds = range(n) if jf else range(n, 2 * n)
        params = [SamplingParams(choice=choices, temperature=1.0, seed=s, max_tokens=16, jump_forward=jf) for s in seeds]
        for out in LLM(engine=engine).generate(["Paris is"] * n, params, use_tqdm=False):
            counts[jf][out.text] = counts[jf].get(out.text, 0) + 1
    categories = sorted(set(counts[True]) | set(counts[False]))
    assert set(categories) <= set(choices)
    a = np.array([counts[True].get(c, 0) for c in categories], dtype=float)
    b = np.array([counts[False].get(c, 0) for c in categories], dtype=float)
    expected_a = (a + b) * a.sum() / (a.sum() + b.sum())
    expected_b = (a + b) * b.sum() / (a.sum() + b.sum())
    chi2 = float((((a - expected_a) ** 2) / expected_a + ((b - expected_b) ** 2) / expected_b).sum())
    critical = {1: 10.83, 2: 13.82, 3: 16.27}[max(1, len(categories) - 1)]  # p = 0.001
    assert chi2 < critical, (counts, chi2)


def test_requests_with_logprobs_do_not_jump_forward(tiny_engine):
    out = generate(tiny_engine, ["Hello"], choice=["The quick brown fox"], temperature=0, max_tokens=16, logprobs=1)[0]
    assert out.text == "The quick brown fox"
    assert len(out.logprobs) == len(out.token_ids) and all(r.logprob is not None for r in out.logprobs)


def test_the_guide_walks_only_new_tokens_and_forgets_drafts(tiny_engine, tiny_loaded):
    engine = tiny_engine
    engine.add_request("Hello", SamplingParams(regex="[0-9]+", max_tokens=10), request_id="walk")
    request = engine.requests["walk"]
    guide = structured.guide_of(request)
    one = tiny_loaded.tokenizer.encode("1", False)[0]
    request.output_token_ids += [one, one]
    s2 = guide.state_after(request, [one, one, one])  # one draft on top
    assert guide.length == 2 and s2 != DEAD
    request.output_token_ids.append(one)
    assert guide.state_after(request, list(request.output_token_ids)) == s2 and guide.length == 3
    engine.abort("walk")
    engine.step()
