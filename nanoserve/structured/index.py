"""The token-level index: for each automaton state, the tokens allowed and where each leads.

    byte DFA (fsm.py) x vocabulary byte strings  -->  TokenIndex (this module)

A token is allowed in state s iff walking its bytes from s never hits DEAD, and it leads
to the state the walk ends in. Every state of the byte DFA can be a token boundary (a
token may end inside a character), so the walk starts from all of them at once and keeps
only the states reachable from the start. It is vectorised over (state, token) pairs:

    byte 0     next[s, t] = T[s, bytes[t, 0]]          one gather, [num_states, V]
    byte i     the pairs still alive and longer than i  take one more byte each

Most pairs die on their first byte (a state expecting ``"`` admits only tokens that begin
with one), so the work after byte 0 is small: SmolLM2's 49,152 tokens against a JSON
schema of 8 fields take well under a second (docs/structured.md has the numbers).

Three passes then shape the raw walk into the constraint the sampler enforces:

1. **Forced runs (canonical tokenization).** Where the automaton admits exactly one byte
   string for a while (a JSON key, ``": "``), every token *inside* that run is replaced by
   one: the first token of the tokenizer's own encoding of the rest of the run. Tokens that
   cover the whole run and go on past its end stay allowed, so the model still chooses
   how to cross the boundary. A state inside a run thus allows exactly one token, and
   jump-forward (guide.py) appends it without a forward pass.
2. **Pruning.** States from which no accepting state can be reached by tokens are
   removed, with the transitions into them: the sampler can never walk into a dead end.
3. **Distances.** ``dist[s]``: the fewest tokens from s to an accepting state. The mask
   admits a token only if its state can still finish within the tokens left, so a
   constrained answer always ends complete within ``max_tokens``.

Layout (CSR, states renumbered 0 .. num_states - 1, the start is 0)::

    indptr [S + 1]   state s's entries are indptr[s] .. indptr[s + 1] - 1
    tokens [nnz]     allowed token ids, sorted within each state
    next   [nnz]     the state each leads to
    finals [S]       accepting: EOS is allowed here (and only here)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoserve.structured.fsm import DEAD, ByteDFA

CHUNK_STATES = 32  # states per first-byte gather: 32 x 49152 int32 = 6 MiB


@dataclass
class Vocabulary:
    """A tokenizer's tokens as raw bytes, for walking automata.

    token_bytes [V]: each token's bytes; special tokens (``<|im_end|>``) are b"" and never
    allowed as text. eos_token_ids: allowed in accepting states. ``encode`` tokenizes a
    string without special tokens (for forced runs).
    """

    token_bytes: list[bytes]
    eos_token_ids: frozenset[int]
    encode: Any  # str -> list[int]
    matrix: np.ndarray = field(init=False, repr=False)  # [V, max_len] uint16, 256 = past the end
    lengths: np.ndarray = field(init=False, repr=False)  # [V] int32

    def __post_init__(self) -> None:
        self.lengths = np.array([len(b) for b in self.token_bytes], dtype=np.int32)
        width = max(1, int(self.lengths.max(initial=1)))
        flat = np.frombuffer(b"".join(self.token_bytes), dtype=np.uint8)
        self.matrix = np.full((len(self.token_bytes), width), 256, dtype=np.uint16)
        rows = np.repeat(np.arange(len(self.token_bytes)), self.lengths)
        cols = np.arange(flat.size) - np.repeat(np.cumsum(self.lengths) - self.lengths, self.lengths)
        self.matrix[rows, cols] = flat

    @property
    def size(self) -> int:
        return len(self.token_bytes)


_VOCABULARIES: weakref.WeakKeyDictionary[Any, Vocabulary] = weakref.WeakKeyDictionary()


def vocabulary_of(tokenizer: Any) -> Vocabulary:
    """The :class:`Vocabulary` of a :class:`nanoserve.tokenizer.Tokenizer` (built once per tokenizer)."""
    if tokenizer not in _VOCABULARIES:
        from nanoserve.tokenizer import token_bytes

        backend = tokenizer.backend
        special = {i for i, t in backend.get_added_tokens_decoder().items() if getattr(t, "special", False)}
        pieces = [b"" if i in special else token_bytes(backend.id_to_token(i) or "") for i in range(tokenizer.vocab_size)]
        _VOCABULARIES[tokenizer] = Vocabulary(
            pieces, frozenset(tokenizer.eos_token_ids), lambda text: tokenizer.encode(text, add_special_tokens=False)
        )
    return _VOCABULARIES[tokenizer]


def walk_all(dfa: ByteDFA, vocab: Vocabulary, states: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (state, token) pair whose bytes the DFA reads from ``states`` [F] (the hot loop).

    Returns (state [P], token [P], next [P]) int32 arrays, in state then token order.
    """
    dead = dfa.num_states
    table = np.full((dfa.num_states + 1, 257), dead, dtype=np.int32)  # row `dead` absorbs; column 256 pads
    table[:-1, :256] = np.where(dfa.transitions == DEAD, dead, dfa.transitions)
    table[:, 256] = np.arange(dfa.num_states + 1)
    first = vocab.matrix[:, 0]
    usable = vocab.lengths > 0
    out_s, out_t, out_n = [], [], []
    for start in range(0, len(states), CHUNK_STATES):
        chunk = states[start : start + CHUNK_STATES]
        nxt = table[chunk][:, first]  # [c, V]: after each token's first byte
        si, ti = np.nonzero((nxt != dead) & usable)
        cur = nxt[si, ti]
        si = chunk[si]
        for i in range(1, vocab.matrix.shape[1] + 1):
            done = vocab.lengths[ti] <= i
            out_s.append(si[done])
            out_t.append(ti[done])
            out_n.append(cur[done])
            si, ti, cur = si[~done], ti[~done], cur[~done]
            if not ti.size:
                break
            cur = table[cur, vocab.matrix[ti, i]]
            alive = cur != dead
            si, ti, cur = si[alive], ti[alive], cur[alive]
    s, t, n = (np.concatenate(x).astype(np.int32) if x else np.zeros(0, np.int32) for x in (out_s, out_t, out_n))
    order = np.lexsort((t, s))
    return s[order], t[order], n[order]


def forced_run(dfa: ByteDFA, state: int) -> bytes:
    """The bytes the automaton must read next from ``state``, cut to whole characters.

    The run goes on while the state is not accepting and has exactly one outgoing byte; it
    is cut back to the last character state on it (b"" if ``state`` is inside a character).
    """
    if state >= dfa.num_char_states:
        return b""
    run, whole, seen = bytearray(), 0, {state}
    while not dfa.finals[state]:
        out = np.flatnonzero(dfa.transitions[state] != DEAD)
        if out.size != 1:
            break
        run.append(int(out[0]))
        state = int(dfa.transitions[state, out[0]])
        if state in seen:  # a cycle of single bytes that never accepts: nothing ends it
            break
        seen.add(state)
        if state < dfa.num_char_states:
            whole = len(run)
    return bytes(run[:whole])


@dataclass
class TokenIndex:
    """A constraint compiled against one vocabulary (see the module docstring for the layout)."""

    indptr: np.ndarray  # [S + 1] int64
    tokens: np.ndarray  # [nnz] int32, sorted within a state
    next: np.ndarray  # [nnz] int32
    finals: np.ndarray  # [S] bool
    dist: np.ndarray  # [S] int32: fewest tokens to an accepting state
    max_next_dist: np.ndarray  # [S] int32: the largest dist among a state's next states
    eos_token_ids: frozenset[int]
    vocab_size: int
    runs: dict[int, bytes] = field(default_factory=dict)  # state -> its forced run (for display)

    initial: int = 0

    @property
    def num_states(self) -> int:
        return len(self.finals)

    def allowed(self, state: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [k], next states [k]) allowed in ``state``, ignoring the token budget."""
        lo, hi = self.indptr[state], self.indptr[state + 1]
        return self.tokens[lo:hi], self.next[lo:hi]

    def allowed_within(self, state: int, tokens_left: int) -> np.ndarray:
        """Token ids allowed in ``state`` when at most ``tokens_left`` more tokens (this one
        included) may follow: those whose next state finishes in time, and EOS if accepting.

        If the budget admits nothing (an answer that can no longer finish), the budget is
        ignored rather than leave the row without a token.
        """
        tokens, nxt = self.allowed(state)
        if tokens_left - 1 < self.max_next_dist[state]:
            keep = self.dist[nxt] <= tokens_left - 1
            if keep.any() or self.finals[state]:
                tokens = tokens[keep]
        if self.finals[state] and self.eos_token_ids:
            tokens = np.concatenate([tokens, np.fromiter(sorted(self.eos_token_ids), dtype=np.int32)])
        return tokens

    def forced_token(self, state: int, tokens_left: int) -> int | None:
        """The one token ``state`` allows with ``tokens_left`` to go, or None if it allows several."""
        lo, hi = self.indptr[state], self.indptr[state + 1]
        count = int(hi - lo) + (len(self.eos_token_ids) if self.finals[state] else 0)
        if count == 1:
            return int(self.tokens[lo]) if hi > lo else next(iter(self.eos_token_ids))
        if tokens_left - 1 >= self.max_next_dist[state]:  # the budget removes nothing
            return None
        allowed = self.allowed_within(state, tokens_left)
        return int(allowed[0]) if allowed.size == 1 else None

    def step(self, state: int, token: int) -> int:
        """The state after ``token`` in ``state``, or DEAD if the token is not allowed there."""
        if state == DEAD:
            return DEAD
        tokens, nxt = self.allowed(state)
        i = int(np.searchsorted(tokens, token))
        return int(nxt[i]) if i < tokens.size and tokens[i] == token else DEAD

    def walk(self, state: int, token_ids: list[int]) -> int:
        for token in token_ids:
            state = self.step(state, token)
            if state == DEAD:
                break
        return state

    def check_invariants(self) -> None:
        """Every state can still finish; dist is 0 exactly at accepting states and drops by one along some token."""
        assert self.indptr[0] == 0 and self.indptr[-1] == self.tokens.size == self.next.size
        assert (self.dist >= 0).all(), "a state that cannot finish survived pruning"
        assert (self.dist[self.finals] == 0).all() and (self.dist[~self.finals] > 0).all()
        for s in range(self.num_states):
            tokens, nxt = self.allowed(s)
            assert (np.diff(tokens) > 0).all(), f"state {s}: tokens not sorted or repeated"
            if not self.finals[s]:
                assert self.dist[nxt].min() == self.dist[s] - 1, f"state {s}: dist is not a shortest path"


def build_index(dfa: ByteDFA, vocab: Vocabulary, canonical_runs: bool = True) -> TokenIndex:
    """The token-level index of ``dfa`` over ``vocab`` (module docstring: walk, runs, prune, dist).

    ``canonical_runs=False`` skips pass 1: the plain index (what outlines-core computes).
    """
    s, t, n = walk_all(dfa, vocab, np.arange(dfa.num_states, dtype=np.int32))
    runs: dict[int, bytes] = {}
    if canonical_runs:
        keep = np.ones(s.size, dtype=bool)
        starts = np.searchsorted(s, np.arange(dfa.num_states + 1))
        for state in range(dfa.num_char_states):
            run = forced_run(dfa, state)
            first = _first_token(vocab, run)
            if first is None:
                continue
            lo, hi = starts[state], starts[state + 1]
            keep[lo:hi] = (t[lo:hi] == first) | (vocab.lengths[t[lo:hi]] > len(run))
            runs[state] = run
        s, t, n = s[keep], t[keep], n[keep]
    return _prune(dfa, vocab, s, t, n, runs)


def _first_token(vocab: Vocabulary, run: bytes) -> int | None:
    """The first token of the tokenizer's encoding of ``run``, if it spells a prefix of it."""
    if not run:
        return None
    try:
        ids = vocab.encode(run.decode("utf-8"))
    except UnicodeDecodeError:
        return None
    if not ids or not 0 <= ids[0] < vocab.size:
        return None
    piece = vocab.token_bytes[ids[0]]
    return ids[0] if piece and run.startswith(piece) else None


def _prune(dfa: ByteDFA, vocab: Vocabulary, s: np.ndarray, t: np.ndarray, n: np.ndarray, runs: dict[int, bytes]) -> TokenIndex:
    """Keep the states reachable from the start that can reach an accepting state; renumber; dist."""
    num = dfa.num_states
    edges = np.unique(s.astype(np.int64) * num + n)  # the state graph, one edge per (s, next) pair
    src, dst = (edges // num).astype(np.int32), (edges % num).astype(np.int32)
    forward: list[list[int]] = [[] for _ in range(num)]
    backward: list[list[int]] = [[] for _ in range(num)]
    for a, b in zip(src.tolist(), dst.tolist()):
        forward[a].append(b)
        backward[b].append(a)
    reachable = _bfs([dfa.initial], forward, num) >= 0
    dist = _bfs(np.flatnonzero(dfa.finals).tolist(), backward, num)  # tokens to an accepting state
    live = reachable & (dist >= 0)
    if not live[dfa.initial]:
        return _empty(vocab)
    order = np.concatenate([[dfa.initial], np.flatnonzero(live & (np.arange(num) != dfa.initial))])
    renumber = np.full(num, -1, dtype=np.int32)
    renumber[order] = np.arange(order.size, dtype=np.int32)
    keep = live[s] & live[n]
    s, t, n = renumber[s[keep]], t[keep], renumber[n[keep]]
    sort = np.lexsort((t, s))
    s, t, n = s[sort], t[sort], n[sort]
    indptr = np.searchsorted(s, np.arange(order.size + 1)).astype(np.int64)
    new_dist = dist[order].astype(np.int32)
    max_next = np.zeros(order.size, dtype=np.int32)
    if n.size:
        np.maximum.at(max_next, s, new_dist[n])
    return TokenIndex(
        indptr=indptr,
        tokens=t.astype(np.int32),
        next=n.astype(np.int32),
        finals=dfa.finals[order].copy(),
        dist=new_dist,
        max_next_dist=max_next,
        eos_token_ids=vocab.eos_token_ids,
        vocab_size=vocab.size,
        runs={int(renumber[k]): v for k, v in runs.items() if live[k]},
    )


def _bfs(sources: list[int], graph: list[list[int]], num: int) -> np.ndarray:  # -> [num] int32, -1 = unreached
    dist = np.full(num, -1, dtype=np.int32)
    frontier = list(sources)
    dist[frontier] = 0
    level = 0
    while frontier:
        level += 1
        nxt = []
        for a in frontier:
            for b in graph[a]:
                if dist[b] < 0:
                    dist[b] = level
                    nxt.append(b)
        frontier = nxt
    return dist


def _empty(vocab: Vocabulary) -> TokenIndex:
    """The index of a constraint no token sequence satisfies (num_states 0)."""
    z = np.zeros(0, dtype=np.int32)
    return TokenIndex(np.zeros(1, np.int64), z, z, np.zeros(0, bool), z, z, vocab.eos_token_ids, vocab.size)
