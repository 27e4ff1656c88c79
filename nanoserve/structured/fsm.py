"""A regular expression as a byte-level DFA: the automaton a token's bytes are walked through.

    regex --interegular--> character DFA --utf8_expand--> byte DFA  (this module)
          --index.py-->    token-level index                           (per vocabulary)

The regex is parsed into a deterministic automaton over *characters* by ``interegular``
(parsing regexes is not what nanoserve teaches). A byte-level BPE token, though, is a
string of *bytes* and may end in the middle of a multi-byte UTF-8 character, so the
character DFA is expanded into one over bytes: each character transition becomes the
chain of its UTF-8 bytes, with intermediate states for "inside a character". The
intermediate states are shared: two prefixes whose remaining transitions agree get one
state, keyed by what is left to read (Russ Cox's UTF-8 range trick, without the ranges)::

    char DFA   q --'é' (U+00E9)--> r        byte DFA   q --0xC3--> m --0xA9--> r
               q --'è' (U+00E8)--> r                              m --0xA8--> r

A character class such as ``[^"\\\\]`` covers a million code points; they are handled as
sorted ranges, never one by one, so expanding a JSON string's class costs a few dozen
states. Invariant: a byte string takes the byte DFA from ``initial`` to a state in
``finals`` iff it is the UTF-8 encoding of a string the regex fully matches; the character
states keep their numbers (``0 .. num_char_states - 1``), intermediate states follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanoserve.errors import InvalidSamplingParams

DEAD = -1
MAX_CODEPOINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
# UTF-8: the lead bytes of each length, the first code point that length may encode
LEADS = {2: range(0xC2, 0xE0), 3: range(0xE0, 0xF0), 4: range(0xF0, 0xF5)}
FIRST_CODEPOINT = {1: 0x00, 2: 0x80, 3: 0x800, 4: 0x10000}
LEAD_PAYLOAD = {2: 0x1F, 3: 0x0F, 4: 0x07}

Ranges = tuple[tuple[int, int, int], ...]  # sorted, disjoint (first, last, target state), inclusive


@dataclass
class ByteDFA:
    """A deterministic automaton over bytes.

    transitions [num_states, 256] int32: next state, or DEAD (-1).
    finals [num_states] bool: accepting states (always character states).
    States ``< num_char_states`` are the character DFA's; the rest are inside a character.
    """

    transitions: np.ndarray
    initial: int
    finals: np.ndarray
    num_char_states: int

    @property
    def num_states(self) -> int:
        return self.transitions.shape[0]

    def walk(self, state: int, data: bytes) -> int:
        """The state after reading ``data`` from ``state`` (DEAD once no transition exists)."""
        for b in data:
            if state == DEAD:
                break
            state = int(self.transitions[state, b])
        return state

    def accepts(self, data: bytes) -> bool:
        end = self.walk(self.initial, data)
        return end != DEAD and bool(self.finals[end])


def normalise_regex(pattern: str) -> str:
    """Strip one leading ``^`` and one trailing unescaped ``$``: the whole output must match anyway."""
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    return pattern


def char_dfa(pattern: str, field: str = "regex"):  # -> interegular.fsm.FSM
    """The minimal character DFA of ``pattern`` (fully matched); errors name ``field``."""
    import interegular  # lazy: only constrained requests need it

    def fail(why: str) -> None:
        shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
        raise InvalidSamplingParams(f"invalid {field}={shown!r}: {why}")

    if not isinstance(pattern, str) or not pattern:
        fail("must be a non-empty string")
    for look in ("(?=", "(?!", "(?<=", "(?<!"):
        if look in pattern:
            fail("lookaround assertions are not supported")
    try:
        fsm = interegular.parse_pattern(normalise_regex(pattern)).to_fsm().reduce()
    except interegular.patterns.Unsupported as exc:
        fail(f"unsupported regex syntax {exc}")
    except Exception as exc:  # InvalidSyntax and friends carry no message
        fail(f"cannot parse it as a regular expression ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})")
    return fsm


def _symbol_ranges(fsm) -> dict[int, list[tuple[int, int]]]:  # symbol -> sorted code point ranges
    """Each alphabet symbol's characters as ranges; ``anything_else`` is every other code point."""
    from interegular.fsm import anything_else

    by_symbol: dict[int, list[int]] = {}
    listed: list[int] = []
    other = None
    for char, symbol in fsm.alphabet._symbol_mapping.items():
        if char is anything_else:
            other = symbol
            continue
        by_symbol.setdefault(symbol, []).append(ord(char))
        listed.append(ord(char))
    ranges = {symbol: _to_ranges(sorted(cps)) for symbol, cps in by_symbol.items()}
    if other is not None:
        gaps, start = [], 0
        for cp in sorted(listed):
            if cp > start:
                gaps.append((start, cp - 1))
            start = cp + 1
        if start <= MAX_CODEPOINT:
            gaps.append((start, MAX_CODEPOINT))
        ranges[other] = gaps
    return ranges


def _to_ranges(cps: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for cp in cps:
        if out and out[-1][1] == cp - 1:
            out[-1] = (out[-1][0], cp)
        else:
            out.append((cp, cp))
    return out


def _clip(ranges: Ranges, lo: int, hi: int, shift: int) -> Ranges:
    """The part of ``ranges`` inside [lo, hi], moved by -shift."""
    return tuple((max(a, lo) - shift, min(b, hi) - shift, t) for a, b, t in ranges if a <= hi and b >= lo)


def _target(ranges: Ranges, cp: int) -> int:
    for a, b, t in ranges:
        if a <= cp <= b:
            return t
    return DEAD


def utf8_expand(fsm) -> ByteDFA:
    """The byte DFA of a character DFA (``interegular`` FSM): see the module docstring."""
    symbol_ranges = _symbol_ranges(fsm)
    char_states = sorted(fsm.states, key=lambda s: (s != fsm.initial, s))
    number = {s: i for i, s in enumerate(char_states)}
    nodes: dict[tuple[int, Ranges], int] = {}  # (continuation bytes left, ranges) -> state

    def node(left: int, ranges: Ranges) -> int:
        """The state that has ``left`` continuation bytes to read, each 64-way, into ``ranges``."""
        if not ranges:
            return DEAD
        key = (left, ranges)
        if key in nodes:
            return nodes[key]
        state = len(char_states) + len(nodes)
        nodes[key] = state
        row = [DEAD] * 256
        size = 64 ** (left - 1)
        for c in range(64):
            lo, hi = c * size, (c + 1) * size - 1
            if left == 1:
                row[0x80 + c] = _target(ranges, c)
            else:
                row[0x80 + c] = node(left - 1, _clip(ranges, lo, hi, lo))
        rows_by_state[state] = row
        return state

    rows_by_state: dict[int, list[int]] = {}
    for q in char_states:
        pieces = []
        for symbol, target in fsm.map.get(q, {}).items():
            pieces += [(a, b, number[target]) for a, b in symbol_ranges.get(symbol, [])]
        ranges: Ranges = tuple(sorted(pieces))
        row = [DEAD] * 256
        for b in range(0x80):
            row[b] = _target(ranges, b)
        for length, leads in LEADS.items():
            for lead in leads:
                base = (lead & LEAD_PAYLOAD[length]) << (6 * (length - 1))
                lo = max(base, FIRST_CODEPOINT[length])
                hi = min(base + 64 ** (length - 1) - 1, MAX_CODEPOINT)
                if lo > hi:
                    continue
                part = _clip(ranges, lo, hi, 0)
                if length == 3:  # surrogates are no characters
                    part = tuple(r for a, b_, t in part for r in _without(a, b_, t, *SURROGATES))
                row[lead] = node(length - 1, tuple((a - base, b_ - base, t) for a, b_, t in part))
        rows_by_state[number[q]] = row
    n = len(char_states) + len(nodes)
    transitions = np.array([rows_by_state[s] for s in range(n)], dtype=np.int32).reshape(n, 256)
    finals = np.zeros(n, dtype=bool)
    finals[[number[f] for f in fsm.finals]] = True
    return ByteDFA(transitions, number[fsm.initial], finals, len(char_states))


def _without(a: int, b: int, t: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """[a, b] minus [lo, hi], as 0, 1 or 2 ranges."""
    out = []
    if a < lo:
        out.append((a, min(b, lo - 1), t))
    if b > hi:
        out.append((max(a, hi + 1), b, t))
    return out


def compile_regex(pattern: str, field: str = "regex") -> ByteDFA:
    """``pattern`` -> its byte DFA; InvalidSamplingParams naming ``field`` if it cannot be compiled
    or matches nothing at all."""
    dfa = utf8_expand(char_dfa(pattern, field))
    if not dfa.finals.any():
        shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
        raise InvalidSamplingParams(f"invalid {field}={shown!r}: no string matches it (the constraint is unsatisfiable)")
    return dfa
