"""Lab 07's grader: speculative decoding's n-gram proposer and acceptance rules (``nanoserve.spec``).

    property     hypothesis: ``propose_ngram`` and ``NgramProposer.propose`` against a naive
                 scan on random token lists over a 3-token alphabet (so suffixes repeat), and
                 ``accept_greedy`` against a naive loop on random drafts that follow the
                 argmax for a while; a failure prints the shrunk counterexample
    statistical  ``accept_random`` over 100,000 fixed-seed draws per case (a 6-token
                 vocabulary; q = p, disjoint supports, a one-hot q, a flatter q): the first
                 committed token follows p (Pearson's chi-square, p-value > 1e-3) and the
                 acceptance rate is sum(min(p, q)) within 5 standard errors
    integration  the tiny model with speculation on, through the engine's seams
                 (``proposer="FILE.py:NgramProposer"``, ``acceptance="FILE.py"``): greedy
                 tokens equal speculation off for k = 2 and k = 4, drafts were verified,
                 and seeded sampled requests finish through ``accept_random``
    counters     draft tokens, accepted tokens and forward passes saved (steps with
                 speculation off minus on) equal nanoserve's own proposer and rules' on
                 the same workload, for k = 2 and k = 4
    speed        propose_ngram on a long repetitive history, and accept_random calls, against
                 the reference's
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from nanoserve.labs.common import check_imports, check_signatures, load_module
from nanoserve.labs.grader import Criterion, CriterionFailed, Lab, Submission, one_line
from nanoserve.request import Request
from nanoserve.sampling import SamplingParams
from nanoserve.spec import ngram, rejection

HINT_NGRAM = "look only at occurrences that start before len(tokens) - n (the suffix itself is not an earlier occurrence); longest n first, then the latest occurrence"
HINT_GREEDY = "accept while drafts[j] == argmax(target[j]); then append argmax of the row after the last accepted draft"
N_DRAWS = 100_000
STAT_P = np.array([0.05, 0.30, 0.15, 0.0, 0.40, 0.10])  # the target p; token 3 is impossible
STAT_CASES: dict[str, np.ndarray | int] = {  # q, or the token of a one-hot draft
    "q = p": STAT_P.copy(),
    "disjoint supports (q on a token p never gives)": np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0]),
    "one-hot q on token 2 (an n-gram draft)": 2,
    "q flatter than p": np.full(6, 1 / 6),
}
ECHO_SEED, ECHO_LEN, NUM_PROMPTS = 6, 12, 4  # the echo workload: see echo_prompts
ENGINE = {"backend": "ref", "num_blocks": 64, "block_size": 4, "max_num_seqs": 2}


def signatures(sub: Submission) -> str:
    module = load_module(sub, "lab07")
    reference = {"propose_ngram": ngram.propose_ngram, "NgramProposer": ngram.NgramProposer,
                 "accept_greedy": rejection.accept_greedy, "accept_random": rejection.accept_random}
    detail = check_signatures(module, reference)
    try:
        draft = module.Draft([1, 2])
        fields = (list(draft.token_ids), draft.probs)
    except Exception as exc:
        raise CriterionFailed(f"Draft([1, 2]) does not work: {one_line(exc)}", "keep the stub's Draft: a dataclass of token_ids and probs=None") from exc
    if fields != ([1, 2], None):
        raise CriterionFailed(f"Draft([1, 2]) has token_ids, probs = {fields}, want ([1, 2], None)", "keep the stub's Draft")
    return detail + ", and Draft holds token_ids and probs"


def imports(sub: Submission) -> str:
    return check_imports(sub.path, ("nanoserve.spec",), {"nanoserve": {"spec"}})


# --- property ----------------------------------------------------------------------------------
def naive_ngram(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The proposer's contract as a plain scan: longest n first, then the latest earlier start."""
    if k < 1:
        return []
    for n in range(max_n, min_n - 1, -1):
        suffix = tokens[len(tokens) - n :]
        for start in range(len(tokens) - n - 1, -1, -1):  # earlier occurrences, latest first
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def naive_greedy(target: np.ndarray, drafts: list[int]) -> list[int]:
    out: list[int] = []
    for j, d in enumerate(drafts):
        best = int(np.argmax(target[j]))
        if d != best:
            return out + [best]
        out.append(d)
    return out + [int(np.argmax(target[len(drafts)]))]


def request_of(tokens: list[int], split: int) -> Request:
    """A request whose prompt is ``tokens[:split]`` and whose outputs are the rest."""
    params = SamplingParams(temperature=0.0, max_tokens=64)
    request = Request("r0", list(tokens[:split]), params, 64, params.make_generator())
    request.output_token_ids = list(tokens[split:])
    return request


def run_hypothesis(test: Any, failure: list[CriterionFailed]) -> None:
    """Run a hypothesis test; re-raise the shrunk example's CriterionFailed (or the stub's error)."""
    try:
        test()
    except NotImplementedError:
        raise
    except Exception:
        if failure:
            raise failure[-1] from None
        raise


def property_suite(sub: Submission) -> str:
    from hypothesis import HealthCheck, Verbosity, given, settings
    from hypothesis import strategies as st

    module = sub.module
    failure: list[CriterionFailed] = []
    runs = [0, 0]
    common = settings(max_examples=150 if sub.quick else 500, deadline=None, database=None, derandomize=True,
                      verbosity=Verbosity.quiet, suppress_health_check=list(HealthCheck), report_multiple_bugs=False)

    def fail(detail: str, hint: str) -> None:
        failure[:] = [CriterionFailed(detail, hint)]
        raise AssertionError(detail)

    @common
    @given(tokens=st.lists(st.integers(0, 2), max_size=24), min_n=st.integers(1, 3), extra=st.integers(0, 2),
           k=st.integers(1, 5), split=st.integers(0, 24))
    def ngram_prop(tokens: list[int], min_n: int, extra: int, k: int, split: int) -> None:
        runs[0] += 1
        max_n = min_n + extra
        want = naive_ngram(tokens, min_n, max_n, k)
        call = f"propose_ngram({tokens}, min_n={min_n}, max_n={max_n}, k={k})"
        try:
            got = module.propose_ngram(list(tokens), min_n, max_n, k)
        except NotImplementedError:
            raise
        except Exception as exc:
            fail(f"{call} raised {type(exc).__name__}: {exc}\n  shrunk counterexample: {call}", HINT_NGRAM)
        if [int(t) for t in got] != want:
            fail(f"{call} returned {list(got)}, want {want}\n  shrunk counterexample: {call}", HINT_NGRAM)
        split = min(split, len(tokens))
        drafts = module.NgramProposer(min_n, max_n).propose([request_of(tokens, split)], [k])
        where = f"NgramProposer({min_n}, {max_n}).propose([a request with prompt {tokens[:split]}, outputs {tokens[split:]}], [{k}])"
        if len(drafts) != 1 or [int(t) for t in drafts[0].token_ids] != want:
            fail(f"{where} gave {[list(d.token_ids) for d in drafts]}, want one Draft with {want}\n  shrunk counterexample: {where}",
                 "propose_ngram on request.token_ids(0, request.num_tokens), one Draft per request, at most num_tokens[i] tokens")

    @common
    @given(vocab=st.integers(2, 6), cases=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=5), data=st.data())
    def greedy_prop(vocab: int, cases: list[tuple[bool, int]], data: Any) -> None:
        runs[1] += 1
        rows = [data.draw(st.permutations(range(vocab))) for _ in range(len(cases) + 1)]
        target = np.array(rows, dtype=np.float32)  # [k + 1, V], no ties
        drafts = [int(np.argmax(target[j])) if follow else token % vocab for j, (follow, token) in enumerate(cases)]
        want = naive_greedy(target, drafts)
        call = f"accept_greedy(np.array({rows}, dtype=np.float32), {drafts})"
        try:
            got = module.accept_greedy(target.copy(), list(drafts))
        except NotImplementedError:
            raise
        except Exception as exc:
            fail(f"{call} raised {type(exc).__name__}: {exc}\n  shrunk counterexample: {call}", HINT_GREEDY)
        if [int(t) for t in got] != want:
            fail(f"{call} returned {list(got)}, want {want}\n  shrunk counterexample: {call}", HINT_GREEDY)

    run_hypothesis(ngram_prop, failure)
    run_hypothesis(greedy_prop, failure)
    return f"{runs[0]} random token lists agree with a naive scan; {runs[1]} random drafts with a naive accept_greedy"


# --- statistical -------------------------------------------------------------------------------
def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square(df): the regularised upper incomplete gamma Q(df/2, x/2)."""
    a, z = df / 2, x / 2
    if z <= 0:
        return 1.0
    if z < a + 1:  # series for the lower function P
        term = total = 1.0 / a
        n = a
        while term > total * 1e-15:
            n += 1
            term *= z / n
            total += term
        return max(0.0, 1.0 - total * math.exp(-z + a * math.log(z) - math.lgamma(a)))
    b, c, d = z + 1 - a, 1e300, 1 / (z + 1 - a)  # continued fraction for Q (Lentz)
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = b + an / c
        c = c if abs(c) > 1e-300 else 1e-300
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(-z + a * math.log(z) - math.lgamma(a)) * h


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of ``counts`` against ``probs`` over the cells where probs > 0."""
    support = probs > 0
    expected = counts.sum() * probs[support]
    return chi2_sf(float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1)


def first_tokens(accept_random: Any, q: np.ndarray | int, seed: int) -> tuple[np.ndarray, float]:
    """N_DRAWS calls with one draft: counts of the first committed token, and the acceptance rate."""
    vocab = len(STAT_P)
    rng = np.random.default_rng(seed)
    target = np.stack([STAT_P, STAT_P])  # [2, V]: the draft's position and the bonus position
    if isinstance(q, int):
        drafts, q_rows = np.full(N_DRAWS, q), None
    else:
        drafts, q_rows = np.random.default_rng(seed + 1).choice(vocab, size=N_DRAWS, p=q), q[None, :]
    counts = np.zeros(vocab, dtype=np.int64)
    accepted = 0
    for x in drafts.tolist():
        out = accept_random(target, [x], q_rows, rng)
        if not 1 <= len(out) <= 2 or (len(out) == 2 and int(out[0]) != x) or not 0 <= int(out[0]) < vocab:
            raise CriterionFailed(f"accept_random(p, [{x}], q, rng) returned {list(out)}: want [{x}, bonus] or [correction]",
                                  "return the accepted drafts, then one more token")
        counts[int(out[0])] += 1
        accepted += len(out) == 2
    return counts, accepted / N_DRAWS


def statistical(sub: Submission) -> str:
    worst = 1.0
    for seed, (case, q) in enumerate(STAT_CASES.items(), start=1):
        counts, rate = first_tokens(sub.module.accept_random, q, seed)
        q_vec = np.eye(len(STAT_P))[q] if isinstance(q, int) else q
        want_rate = float(np.minimum(STAT_P, q_vec).sum())
        seen = f"first tokens {counts.tolist()} over {N_DRAWS:,} draws, p = {STAT_P.tolist()}"
        if counts[STAT_P == 0].sum():
            raise CriterionFailed(f"{case}: drew token 3, where p is 0, {counts[3]} times ({seen})",
                                  "accept x with probability min(1, p(x) / q(x)): a draft p never gives must always be rejected")
        tolerance = 5 * math.sqrt(want_rate * (1 - want_rate) / N_DRAWS) + 1e-9
        if abs(rate - want_rate) > tolerance:
            raise CriterionFailed(f"{case}: acceptance rate {rate:.4f}, want sum(min(p, q)) = {want_rate:.4f} (+-{tolerance:.4f})",
                                  "accept when u * q(x) < p(x) with u uniform in [0, 1): that is probability min(1, p(x) / q(x))")
        p_value = chi_square_p(counts, STAT_P)
        if p_value <= 1e-3:
            raise CriterionFailed(f"{case}: the first token does not follow p (chi-square p-value {p_value:.2g}; {seen})",
                                  "on rejection draw from normalize(max(0, p - q)), not from p: p alone gives a rejected draft a second chance")
        worst = min(worst, p_value)
    return f"{len(STAT_CASES)} cases x {N_DRAWS:,} draws: the first token follows p (smallest chi-square p-value {worst:.3f}), acceptance = sum(min(p, q))"


# --- integration and counters --------------------------------------------------------------------
def serve(loaded: Any, prompts: list[list[int]], params: SamplingParams, **engine_kwargs: Any) -> tuple[list[list[int]], Any]:
    """Serve ``prompts`` on ``LLMEngine(loaded=loaded, **ENGINE, **engine_kwargs)``, checking every
    part's invariants after each step; returns each request's tokens and the final stats."""
    from nanoserve.engine import LLMEngine

    engine = LLMEngine(loaded=loaded, **ENGINE, **engine_kwargs)
    ids = [engine.add_request(prompt, params) for prompt in prompts]
    final: dict[str, list[int]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished and out.finish_reason == "error":
                error = str(out.error)
                if "NotImplementedError" in error and "Lab " in error:
                    raise NotImplementedError(error[error.index("Lab "):])
                raise CriterionFailed(f"a request failed inside the engine: {error}", "accept_greedy and accept_random return the accepted drafts, then one more token")
            if out.finished:
                final[out.request_id] = list(out.token_ids)
        engine.check_invariants()
    if engine.has_unfinished_requests():
        raise CriterionFailed("the engine did not finish the workload in 10,000 steps")
    return [final[i] for i in ids], engine.stats()


def student_parts(sub: Submission) -> dict[str, str]:
    return {"proposer": f"{sub.path}:NgramProposer", "acceptance": sub.path}


GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def echo_prompts(loaded: Any) -> list[list[int]]:
    """Each prompt is a random seed, the model's own greedy continuation of it, and the seed
    again: prompt lookup then proposes that continuation, multi-token drafts from the first
    step on, and a model that repeats itself accepts them (the tiny random one mostly does not)."""
    rng = np.random.default_rng(0)
    seeds = [[int(t) for t in rng.integers(3, loaded.config.vocab_size, size=ECHO_SEED)] for _ in range(NUM_PROMPTS)]
    continuations, _ = serve(loaded, seeds, SamplingParams(temperature=0.0, max_tokens=ECHO_LEN, ignore_eos=True))
    return [seed + continuation + seed for seed, continuation in zip(seeds, continuations)]


def integration(sub: Submission) -> str:
    if sub.loaded is None:
        raise CriterionFailed("no model to serve (pass --model)")
    prompts = echo_prompts(sub.loaded)
    plain, plain_stats = serve(sub.loaded, prompts, GREEDY)
    runs: dict[int, Any] = {}
    for k in (2, 4):
        tokens, stats = serve(sub.loaded, prompts, GREEDY, speculative="ngram", num_speculative_tokens=k, **student_parts(sub))
        for i, (got, want) in enumerate(zip(tokens, plain, strict=True)):
            if got != want:
                at = next((j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
                raise CriterionFailed(f"k = {k}, request {i}: token {at} is {got[at] if at < len(got) else 'missing'}, speculation off gives {want[at] if at < len(want) else 'none'}",
                                      "a correction is the argmax of the row after the last accepted draft")
        if stats.spec_decoding.num_draft_tokens == 0:
            raise CriterionFailed(f"k = {k}: no draft was verified, on prompts that repeat themselves", HINT_NGRAM)
        runs[k] = stats
    sampled = SamplingParams(temperature=0.8, top_k=20, max_tokens=24, seed=0, ignore_eos=True)
    tokens, _ = serve(sub.loaded, prompts, sampled, speculative="ngram", num_speculative_tokens=4, **student_parts(sub))
    if [len(t) for t in tokens] != [24] * len(prompts):
        raise CriterionFailed(f"sampled requests ended with {[len(t) for t in tokens]} tokens, want 24 each")
    sub.scratch["counters"] = (prompts, plain_stats, runs)
    s4 = runs[4].spec_decoding
    return (f"{len(prompts)} requests x 32 greedy tokens equal speculation off for k = 2 and 4 "
            f"(k = 4: {s4.num_accepted_tokens}/{s4.num_draft_tokens} drafts accepted); seeded sampled requests finish")


def counters(sub: Submission) -> str:
    if "counters" not in sub.scratch:
        raise CriterionFailed("needs the integration runs, which failed")
    prompts, plain_stats, runs = sub.scratch["counters"]
    lines = []
    for k, got in runs.items():
        _, want = serve(sub.loaded, prompts, GREEDY, speculative="ngram", num_speculative_tokens=k)
        g, w = got.spec_decoding, want.spec_decoding
        pairs = {"draft tokens": (g.num_draft_tokens, w.num_draft_tokens), "accepted tokens": (g.num_accepted_tokens, w.num_accepted_tokens),
                 "forward passes saved": (plain_stats.num_steps - got.num_steps, plain_stats.num_steps - want.num_steps)}
        wrong = [f"{name} {a} (reference {b})" for name, (a, b) in pairs.items() if a != b]
        if wrong:
            raise CriterionFailed(f"k = {k}: " + ", ".join(wrong), HINT_NGRAM)
        saved = plain_stats.num_steps - got.num_steps
        lines.append(f"k = {k}: {g.num_accepted_tokens}/{g.num_draft_tokens} drafts accepted, {saved} of {plain_stats.num_steps} forward passes saved")
    return "; ".join(lines) + ", as the reference"


def speed(sub: Submission) -> str:
    """propose_ngram on a 4,096-token repetitive history, and 10,000 one-hot accept_random calls."""
    rng = np.random.default_rng(0)
    history = [int(t) for t in np.tile(rng.integers(0, 50, size=64), 64)]
    history += [int(t) for t in rng.integers(50, 100, size=3)]  # a suffix that occurs nowhere earlier: the longest scan
    p = np.stack([STAT_P, STAT_P])
    times = []
    for propose, accept in ((sub.module.propose_ngram, sub.module.accept_random), (ngram.propose_ngram, rejection.accept_random)):
        start = time.perf_counter()
        for _ in range(20):
            propose(history, 2, 4, 4)
        mid = time.perf_counter()
        gen = np.random.default_rng(1)
        for _ in range(10_000):
            accept(p, [2], None, gen)
        times.append((mid - start, time.perf_counter() - mid))
    (ng, ar), (ref_ng, ref_ar) = times
    return (f"propose_ngram on 4,099 tokens: {1e3 * ng / 20:.2f} ms a call ({ng / ref_ng:.2f}x the reference); "
            f"accept_random: {1e6 * ar / 10_000:.1f} us a call ({ar / ref_ar:.2f}x the reference)")


CRITERIA = [
    Criterion("signatures", "Draft, propose_ngram, NgramProposer, accept_greedy, accept_random match nanoserve's", signatures, gate=True),
    Criterion("imports", "does not import nanoserve.spec", imports, gate=True),
    Criterion("property", "the proposer and accept_greedy against naive references (hypothesis, shrunk counterexamples)", property_suite, points=30),
    Criterion("statistical", "accept_random's tokens follow p and its acceptance rate is sum(min(p, q)) (chi-square, 1e5 draws a case)", statistical, points=30),
    Criterion("integration", "your proposer and rules in the engine: greedy tokens equal speculation off, k = 2 and 4", integration, points=25),
    Criterion("counters", "draft tokens, accepted tokens and forward passes saved equal the reference's", counters, points=15),
]

LAB = Lab("07", "speculative", "speculative decoding: the n-gram proposer and the rejection sampler", "nanoserve.spec (ngram.py, rejection.py)", tuple(CRITERIA), speed)
