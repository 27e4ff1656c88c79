"""Lab 09's grader: paged attention written as a numba.cuda kernel (``paged_attention``).

The student's file is used as a kernel backend (:func:`nanoserve.kernels.get_backend` by
path): ``paged_attention`` (a launcher with the reference's signature, around the
student's ``@cuda.jit`` kernel) comes from it, every other kernel from the reference.

Where the kernel runs. numba reads ``NUMBA_ENABLE_CUDASIM`` once, when it is first
imported, and the process that grades may have imported numba already (the CPU backend
uses it). So every criterion that launches the kernel runs in a fresh Python process
(:func:`worker_main`) with ``NUMBA_ENABLE_CUDASIM=1``: Numba's CUDA simulator, where each
CUDA thread is a Python thread, on any machine. The ``gpu`` criterion runs the same checks
with the simulator off, on a real GPU, and is blocked where there is none.

    signatures   paged_attention takes the reference's parameters; the file defines a
                 @cuda.jit kernel
    imports      no kernels_ref, kernels_cpu, nanoserve.kernels, nor kernels_cuda's
                 attention (its launch helpers in kernels_cuda._runtime are allowed)
    property     the kernel suite on paged_attention under the simulator (tiny shapes:
                 ragged batches of decodes and prefill chunks, pages scattered through
                 the pool, GQA, float16 caches), with the shrunk example; a failing
                 example whose output changes from run to run is named as a race
    invariants   a fixed batch (a decode and a prefill chunk, 2-token pages, GQA 4:2):
                 query heads read KV head h // (H / Hkv); future keys and slots outside
                 every sequence (NaN-filled) never reach the output; permuting the pool's
                 pages and removing the other sequence change nothing, bit for bit
    integration  the engine on the given model, the student's kernel for every layer,
                 a small workload (2-token pages, a chunked prefill beside a decode):
                 greedy tokens equal the reference engine's
    gpu          property at the default model's shapes and the integration again, on a
                 real NVIDIA GPU (blocked without one)
    speed        one launch at a decode-batch shape, against the reference (simulator,
                 or the GPU where there is one)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from nanoserve.labs.common import check_imports, check_signatures, load_module
from nanoserve.labs.grader import Blocked, Criterion, CriterionFailed, Lab, Submission, one_line

#: Longest a worker may take (the simulator is slow, a hung barrier never returns).
WORKER_TIMEOUT_S = 600
RESULT_TAG = "LAB09-RESULT "
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HINT = (
    "token j of sequence s is in block block_tables[s, j // B] at offset j % B; query i of "
    "the sequence sits at position seq_len - q_len + i and sees keys 0 .. that position; query head h reads KV head h // (H / Hkv)"
)
HINT_RACE = "its output changes from run to run: a race. Every thread must pass a cuda.syncthreads() between one thread writing shared memory and another reading it"
HINT_GQA = "query head h reads KV head h // (H / Hkv): the g = H / Hkv heads of a group are consecutive"


def signatures(sub: Submission) -> str:
    import kernels_ref

    module = load_module(sub, "lab09")
    detail = check_signatures(module, {"paged_attention": kernels_ref.paged_attention})
    kernels = [n for n, v in vars(module).items() if type(v).__module__.startswith("numba.cuda")]
    if not kernels:
        raise CriterionFailed("the file defines no @cuda.jit kernel", "decorate the kernel with @cuda.jit and launch it from paged_attention as kernel[grid, threads](...)")
    return detail + f"; @cuda.jit: {', '.join(kernels)}"


def imports(sub: Submission) -> str:
    forbidden = ("kernels_ref", "kernels_cpu", "kernels_cuda.attention", "nanoserve.kernels", "nanoserve.check_kernels")
    return check_imports(sub.path, forbidden, {"kernels_cuda": {"paged_attention", "attention", "paged_attention_kernel"}})


# --- the parent's side: run a criterion in a fresh process, read its verdict ----------------------


def run_worker(criterion: str, sub: Submission, simulator: bool) -> str:
    """Run ``criterion`` in a fresh Python with the simulator on or off; its detail, or raise."""
    argv = [criterion, sub.path, "--quick" if sub.quick else "--full"]
    if sub.loaded is not None:
        argv += ["--model", sub.loaded.path]
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1" if simulator else "0"}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "import sys; from nanoserve.labs.lab09 import worker_main; sys.exit(worker_main(sys.argv[1:]))"
    try:
        done = subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=os.path.dirname(sub.path) or None,
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise CriterionFailed(f"{criterion} took longer than {WORKER_TIMEOUT_S} s", "a thread that never reaches a barrier the others wait at hangs the block; every thread must call each cuda.syncthreads()") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if not lines:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CriterionFailed(f"the {criterion} check crashed (exit code {done.returncode}): {last}", "run the failing example yourself under NUMBA_ENABLE_CUDASIM=1")
    verdict = json.loads(lines[-1][len(RESULT_TAG):])
    if verdict["status"] == "not implemented":
        raise NotImplementedError(verdict["detail"])
    if verdict["status"] == "blocked":
        raise Blocked(verdict["detail"])
    if verdict["status"] != "pass":
        raise CriterionFailed(verdict["detail"], verdict.get("hint", ""))
    return verdict["detail"]


SIMULATED = ("property", "invariants", "integration")


def simulated(criterion: str, sub: Submission) -> str:
    """Run ``criterion`` on the simulator; a pass is noted for the gpu criterion."""
    detail = run_worker(criterion, sub, simulator=True)
    sub.scratch.setdefault("passed on the simulator", set()).add(criterion)
    return detail


def property_suite(sub: Submission) -> str:
    return simulated("property", sub)


def invariants(sub: Submission) -> str:
    return simulated("invariants", sub)


def integration(sub: Submission) -> str:
    if sub.loaded is None:
        raise CriterionFailed("no model to serve (pass --model)")
    return simulated("integration", sub)


def gpu(sub: Submission) -> str:
    from nanoserve.check_kernels.gpu import gpu_present

    failed = [c for c in SIMULATED if c not in sub.scratch.get("passed on the simulator", set())]
    if failed:
        raise CriterionFailed(f"not run on a GPU: {', '.join(failed)} failed on the simulator first", "make the kernel right on the simulator, then on the GPU")
    if not gpu_present():
        raise Blocked("no NVIDIA GPU here: the CUDA driver reports no device; property, invariants and integration ran the same kernel on Numba's CUDA simulator")
    return run_worker("gpu", sub, simulator=False)


def speed(sub: Submission) -> str:
    """One launch at a decode batch against the reference (printed only when every criterion passes: on a GPU)."""
    from nanoserve.check_kernels.gpu import gpu_present

    return run_worker("speed", sub, simulator=not gpu_present())


# --- the worker's side: runs inside the fresh process -------------------------------------------


def _backend(path: str) -> Any:
    """The student's backend, with kernels_cuda's simulator fixes applied first."""
    import kernels_cuda._runtime as runtime  # under the simulator: makes shared arrays race-free
    from nanoserve.check_kernels.gpu import SIMULATOR_SWITCH_INTERVAL
    from nanoserve.kernels import get_backend

    if runtime.SIMULATOR:
        sys.setswitchinterval(SIMULATOR_SWITCH_INTERVAL)
    return get_backend(path)


def _is_race(backend: Any, example: dict) -> bool:
    """True when the failing example's output differs between runs of the same kernel."""
    import numpy as np

    from nanoserve.check_kernels import build_case

    outputs = []
    for _ in range(4):
        try:
            outputs.append(_launch(backend, *build_case("paged_attention", example)))
        except Exception:
            return False
    return any(not np.array_equal(outputs[0], o, equal_nan=True) for o in outputs[1:])


def _reads_kv_head_h_mod_hkv(backend: Any, example: dict) -> bool:
    """True when the failing example's output is attention with query head h on KV head h % Hkv."""
    import numpy as np

    import kernels_ref
    from nanoserve.check_kernels import build_case

    q, k, v, *rest = args = build_case("paged_attention", example)
    num_heads, num_kv_heads = q.shape[1], k.shape[2]
    if num_kv_heads == 1 or num_kv_heads == num_heads or q.shape[0] == 0:
        return False
    want = np.concatenate([kernels_ref.paged_attention(q[:, h : h + 1], k[:, :, h % num_kv_heads : h % num_kv_heads + 1], v[:, :, h % num_kv_heads : h % num_kv_heads + 1], *rest) for h in range(num_heads)], axis=1)
    try:
        got = _launch(backend, *args)
    except Exception:
        return False
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-4, atol=1e-4))


def check_property(path: str, quick: bool, large: bool = False) -> str:
    from nanoserve.check_kernels import LARGE, SMALL, check_kernel

    backend = _backend(path)
    examples = (50 if large else 8 if quick else 25)
    report = check_kernel(backend, "paged_attention", limits=LARGE if large else SMALL, max_examples=examples, seed=0)
    if report.status == "ref":
        raise CriterionFailed("paged_attention is missing: the reference was used", "define paged_attention in your file")
    if not report.passed:
        problem = report.problem or ""
        if "NotImplementedError" in problem and "Lab 09" in problem:
            raise NotImplementedError(problem.split("NotImplementedError: ", 1)[1])
        example = report.failing_example
        hint = HINT
        if problem.startswith("nondeterministic") or (example is not None and _is_race(backend, example)):
            hint = HINT_RACE
        elif example is not None and _reads_kv_head_h_mod_hkv(backend, example):
            hint = "it matches query head h reading KV head h % Hkv; " + HINT_GQA
        raise CriterionFailed(report.describe_failure(), hint)
    return f"paged_attention agrees with the reference on {report.examples} examples (edge cases first; largest error {report.worst_ratio:.2f} of the tolerance)"


def _launch(backend: Any, *args: Any) -> Any:  # -> host float32 [T, H, D]
    import numpy as np

    dev = [backend.to_device(np.array(a, copy=True)) if isinstance(a, np.ndarray) else a for a in args]
    return np.asarray(backend.to_host(backend.kernels.paged_attention(*dev)))


def fixed_batch() -> tuple:
    """A decode (1 query, 7 tokens) and a prefill chunk (3 queries, 5 tokens) on 2-token pages.

    GQA 4:2 (query heads 0, 1 read KV head 0; 2, 3 read KV head 1), head dim 4, a pool of 10
    blocks; blocks 1, 6, 8, the second slot of blocks 4 and 3, and table entry 1000 are unused.
    -> q [4, 4, 4], k_cache, v_cache [10, 2, 2, 4], block_tables [2, 4], query_start_loc [3], seq_lens [2], scale
    """
    import numpy as np

    rng = np.random.default_rng(9)
    q = rng.standard_normal((4, 4, 4)).astype(np.float32)
    k_cache = rng.standard_normal((10, 2, 2, 4)).astype(np.float32)
    v_cache = rng.standard_normal((10, 2, 2, 4)).astype(np.float32)
    block_tables = np.array([[7, 2, 9, 4], [0, 5, 3, 1000]], dtype=np.int64)
    return q, k_cache, v_cache, block_tables, np.array([0, 1, 4], dtype=np.int64), np.array([7, 5], dtype=np.int64), 0.5


UNUSED_SLOTS = [(1, 0), (1, 1), (6, 0), (6, 1), (8, 0), (8, 1), (4, 1), (3, 1)]  # (block, offset) of fixed_batch


def check_invariants(backend: Any) -> str:
    import numpy as np

    q, k, v, tables, starts, lens, scale = batch = fixed_batch()
    before = [np.array(a, copy=True) for a in batch[:6]]
    base = _launch(backend, *batch)
    if base.shape != q.shape or base.dtype != np.float32 or not np.isfinite(base).all():
        raise CriterionFailed(f"paged_attention returned {base.dtype}{list(base.shape)} (finite: {bool(np.isfinite(base).all())}), expected finite float32{list(q.shape)}", HINT)
    if any(not np.array_equal(a, b) for a, b in zip(before, batch[:6], strict=True)):
        raise CriterionFailed("paged_attention modified its input (kernels must not)", "write only to the output array")
    v_heads = v.copy()
    v_heads[:, :, 0], v_heads[:, :, 1] = 0.0, 1.0  # KV head 0's values are all 0, KV head 1's all 1
    out = _launch(backend, q, k, v_heads, tables, starts, lens, scale)
    for h in range(4):
        want = float(h // 2)
        if not np.allclose(out[:, h], want, atol=1e-5):
            raise CriterionFailed(f"with KV head 0's values all 0 and KV head 1's all 1, query head {h} gave {float(out[0, h, 0]):.3g}: with 4 query heads and 2 KV heads it must read KV head {h // 2}", HINT_GQA)
    k_nan, v_nan = k.copy(), v.copy()
    for block, offset in UNUSED_SLOTS:
        k_nan[block, offset], v_nan[block, offset] = np.nan, np.nan
    out = _launch(backend, q, k_nan, v_nan, tables, starts, lens, scale)
    if not np.array_equal(out, base):
        raise CriterionFailed("with NaN in the slots no sequence owns (blocks 1, 6, 8 and the second slot of each last page), the output changed: the kernel reads keys it must not", HINT)
    k_late, v_late = k.copy(), v.copy()
    k_late[3, 0], v_late[3, 0] = np.nan, np.nan  # position 4 of the prefill chunk: its last token
    out = _launch(backend, q, k_late, v_late, tables, starts, lens, scale)
    if not np.array_equal(out[1:3], base[1:3]):
        raise CriterionFailed("the prefill chunk's queries at positions 2 and 3 changed when the key at position 4 did: a query must not see later keys", HINT)
    perm = np.random.default_rng(10).permutation(10)
    k_perm, v_perm = np.empty_like(k), np.empty_like(v)
    k_perm[perm], v_perm[perm] = k, v
    moved = np.where(tables < 10, perm[np.minimum(tables, 9)], tables)
    if not np.array_equal(_launch(backend, q, k_perm, v_perm, moved, starts, lens, scale), base):
        raise CriterionFailed(f"moving every page to another block of the pool (block b -> {perm.tolist()}[b], tables updated) changed the output", HINT)
    for s, rows in ((0, slice(0, 1)), (1, slice(1, 4))):
        alone = _launch(backend, q[rows], k, v, tables[s : s + 1], np.array([0, rows.stop - rows.start]), lens[s : s + 1], scale)
        if not np.array_equal(alone, base[rows]):
            raise CriterionFailed(f"sequence {s} run alone gave another output than in the batch: a sequence's output must not depend on the others", "find the sequence of each query row from query_start_loc")
    return "GQA head map, no later keys, unused slots never read, page permutation and batch independence (bit for bit)"


def engine_tokens(loaded: Any, backend: str) -> tuple[list[list[int]], int]:
    """A small greedy run: 2-token pages, a prefill chunked beside a decode. -> tokens, steps."""
    from nanoserve.engine import LLMEngine
    from nanoserve.sampling import SamplingParams

    engine = LLMEngine(loaded=loaded, backend=backend, num_blocks=24, block_size=2, max_num_batched_tokens=4, prefix_cache="none")
    vocab = loaded.config.vocab_size
    prompts = [[t % vocab for t in (5, 9, 13, 7, 21, 30)], [t % vocab for t in (11, 4)]]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    final: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests() and steps < 200:
        for out in engine.step():
            if out.finished and out.finish_reason == "error":
                error = str(out.error)
                if "NotImplementedError" in error and "Lab " in error:
                    raise NotImplementedError(error[error.index("Lab "):])
                raise CriterionFailed(f"a request failed inside the engine: {error}")
            if out.finished:
                final[out.request_id] = list(out.token_ids)
        engine.check_invariants()
        steps += 1
    return [final.get(i, []) for i in ids], steps


def check_integration(backend: Any, path: str, model: str | None) -> str:
    import types

    from nanoserve.labs.common import compare_tokens
    from nanoserve.model import load_checkpoint

    if model is None:
        raise CriterionFailed("no model to serve (pass --model)")
    loaded = load_checkpoint(model)
    want, steps = engine_tokens(loaded, "ref")
    got, _ = engine_tokens(loaded, path)
    detail = compare_tokens(types.SimpleNamespace(tokens=got), types.SimpleNamespace(tokens=want))
    return detail + f" in {steps} steps ({loaded.config.num_layers} layers x {loaded.config.num_heads} heads, 2-token pages, a chunked prefill beside a decode)"


def measure_speed(backend: Any) -> str:
    """One launch on 4 decodes of 32 tokens, GQA 4:2, head dim 16 (on a GPU: 32 of 512, 9:3, 64), against the reference."""

    import kernels_ref
    from nanoserve.check_kernels import build_case

    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    num_seqs, seq_len, kv_heads, group, dim = (4, 32, 2, 2, 16) if simulated else (32, 512, 3, 3, 64)
    params = {"seqs": [(1, seq_len)] * num_seqs, "block_size": 16, "kv_heads": kv_heads, "group": group, "head_dim": dim,
              "spare_blocks": 0, "table_padding": 0, "unused_entries": "out_of_range", "cache_dtype": "float32", "index_dtype": "int64", "scale": None, "seed": 0}  # fmt: skip
    args = build_case("paged_attention", params)
    _launch(backend, *args)  # compiles on a GPU
    times = []
    for fn in (lambda: _launch(backend, *args), lambda: kernels_ref.paged_attention(*args)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    where = "on the CUDA simulator" if simulated else "on the GPU (host arrays copied per launch)"
    return f"{num_seqs} decodes of {seq_len} tokens: {1e3 * times[0]:.1f} ms {where} ({times[0] / times[1]:.1f}x the NumPy reference's {1e3 * times[1]:.2f} ms)"


def worker_main(argv: list[str]) -> int:
    """``CRITERION PATH --quick|--full [--model DIR]``: print the verdict as one tagged JSON line."""
    criterion, path, mode = argv[0], argv[1], argv[2]
    model = argv[argv.index("--model") + 1] if "--model" in argv else None
    checks = {
        "property": lambda: check_property(path, mode == "--quick"),
        "invariants": lambda: check_invariants(_backend(path)),
        "integration": lambda: check_integration(_backend(path), path, model),
        "gpu": lambda: check_property(path, mode == "--quick", large=True) + "; " + check_integration(_backend(path), path, model),
        "speed": lambda: measure_speed(_backend(path)),
    }
    start = time.perf_counter()
    try:
        verdict = {"status": "pass", "detail": checks[criterion]()}
    except CriterionFailed as failed:
        verdict = {"status": "FAIL", "detail": failed.detail, "hint": failed.hint}
    except Blocked as blocked:
        verdict = {"status": "blocked", "detail": str(blocked)}
    except NotImplementedError as exc:
        verdict = {"status": "not implemented", "detail": str(exc)}
    except Exception as exc:  # the student's kernel raised: a failure like any other
        verdict = {"status": "FAIL", "detail": one_line(exc)}
    verdict["seconds"] = round(time.perf_counter() - start, 1)
    print(RESULT_TAG + json.dumps(verdict), flush=True)
    return 0


CRITERIA = [
    Criterion("signatures", "paged_attention takes the reference's parameters; the file defines a @cuda.jit kernel", signatures, gate=True),
    Criterion("imports", "no kernels_ref, kernels_cpu, nanoserve.kernels or kernels_cuda's attention", imports, gate=True),
    Criterion("property", "the kernel suite on paged_attention under the CUDA simulator, against the reference", property_suite, points=40),
    Criterion("invariants", "GQA head map, causality, unread slots, page permutation and batch independence", invariants, points=20),
    Criterion("integration", "the engine with your kernel on the simulator: greedy tokens equal the reference's", integration, points=20),
    Criterion("gpu", "the property suite at the model's shapes and the integration on a real NVIDIA GPU", gpu, points=20),
]

LAB = Lab("09", "gpu_paged_attention", "paged attention in numba.cuda", "kernels_cuda.attention.paged_attention", tuple(CRITERIA), speed)
