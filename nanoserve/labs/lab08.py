"""Lab 08's grader: the weight-only int4 group-wise linear ``linear_int4`` (and its packing).

The student's file is used as a kernel backend (:func:`nanoserve.kernels.get_backend` by
path): ``linear_int4`` comes from it, every other kernel from the reference. The format is
nanoserve's ``--weights int4`` (``kernels_ref.quant``): two columns per byte, even column
in the low nibble, one float32 scale per group of ``g`` columns, zero point 8.

    property     the kernel suite (nanoserve.check_kernels) on linear_int4: rows 0..32,
                 group sizes 2..32, against the reference within ``tolerances.DOT``; a
                 failure prints the shrunk example, and the hint names the classic bug the
                 output matches (nibbles swapped, one scale per row, zero point kept)
    invariants   a hand-packed row dequantizes to the values the layout says; quantize ->
                 dequantize keeps every weight within half a step and quantizing again
                 gives the same bytes; a zero scale gives a zero output (all scales, or
                 one group's); codes of 8 give zero; linearity in x; float32 [T, out] for
                 T = 0 too; inputs untouched
    integration  the real engine on the model quantized with ``--weights int4``, the
                 student's linear_int4 in every linear layer: greedy tokens equal the
                 reference engine's
    counters     weight bytes the engine's int4 linears read per forward pass (qweight
                 plus scales), equal to the reference run's and set against float32
    speed        the student's kernel against the reference and a float32 matmul, with
                 the temporary memory one decode call allocates
"""

from __future__ import annotations

import dataclasses
import time
import tracemalloc
import types
from typing import Any

import numpy as np

import kernels_ref
from nanoserve.check_kernels.limits import SMALL
from nanoserve.labs.common import check_imports, check_signatures, compare_tokens, load_module, run_engine
from nanoserve.labs.grader import Criterion, CriterionFailed, Lab, Submission
from nanoserve.quant import formats

#: The suite's shapes for this lab: up to 32 rows (a decode batch), in up to 128, out up to 24.
LIMITS = dataclasses.replace(SMALL, max_tokens=32, max_in_blocks=4, max_out=24)

HINT = (
    "dequantize one row by hand: byte k holds column 2k in its low nibble (& 0xF) and column "
    "2k+1 in its high nibble (>> 4); weight c of row o is (nibble - 8) times row o's scale of group c // g, g = in / G"
)
HINT_SWAPPED = "it matches each byte's nibbles swapped: column 2k is the LOW nibble (byte & 0xF), 2k+1 the high one (byte >> 4)"
HINT_PER_ROW = "it matches one scale per row: each group of g columns of a row has its own scale (column c: group c // g)"
HINT_NO_ZERO = "it matches the zero point left out: a nibble q stands for q - 8 (0..15 -> -8..7)"


def signatures(sub: Submission) -> str:
    module = load_module(sub, "lab08")
    reference = {"quantize_int4": formats.quantize_int4, "dequantize_int4": kernels_ref.dequantize_int4, "linear_int4": kernels_ref.linear_int4}
    return check_signatures(module, reference)


def imports(sub: Submission) -> str:
    forbidden = ("kernels_ref", "kernels_cpu", "kernels_cuda", "nanoserve.kernels", "nanoserve.quant", "nanoserve.check_kernels")
    detail = check_imports(sub.path, forbidden, {})
    for name in ("quantize_int4", "dequantize_int4", "linear_int4"):
        if getattr(getattr(sub.module, name), "__module__", "").startswith(("kernels_", "nanoserve.quant")):
            raise CriterionFailed(f"{name} is the reference's own function", "write it yourself")
    return detail


# --- what a wrong output looks like: the classic bugs, computed from the same bytes ---------------


def _codes(qweight: np.ndarray, swapped: bool = False) -> np.ndarray:  # uint8 [out, in/2] -> f32 [out, in] in 0..15
    low, high = (qweight >> 4, qweight & 0x0F) if swapped else (qweight & 0x0F, qweight >> 4)
    q = np.empty((qweight.shape[0], 2 * qweight.shape[1]), dtype=np.float32)
    q[:, 0::2], q[:, 1::2] = low, high
    return q


def _weights(qweight: np.ndarray, scales: np.ndarray, bug: str = "") -> np.ndarray:  # -> f32 [out, in]
    """The float matrix, or the one a classic bug computes instead."""
    q = _codes(qweight, swapped=bug == "swapped") - (0.0 if bug == "no_zero_point" else 8.0)
    group = q.shape[1] // scales.shape[1]
    per_group = scales[:, :1].repeat(scales.shape[1], axis=1) if bug == "per_row" else scales
    return (q.reshape(q.shape[0], scales.shape[1], group) * per_group[:, :, None]).reshape(q.shape)


BUGS = (("swapped", HINT_SWAPPED), ("per_row", HINT_PER_ROW), ("no_zero_point", HINT_NO_ZERO))


def diagnose(got: Any, x: np.ndarray, qweight: np.ndarray, scales: np.ndarray) -> str:
    """The hint for a wrong ``linear_int4`` output: the classic bug it matches, if any."""
    got = np.asarray(got, dtype=np.float64)
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(_weights(qweight, scales).astype(np.float64)).T
    for bug, hint in BUGS:
        want = x.astype(np.float64) @ _weights(qweight, scales, bug).astype(np.float64).T
        if got.shape == want.shape and np.all(np.abs(got - want) <= 1e-5 + 1e-4 * magnitude):
            return hint
    return HINT


def diagnose_weights(got: np.ndarray, qweight: np.ndarray, scales: np.ndarray) -> str:
    """The hint for a wrong ``dequantize_int4`` matrix: the classic bug it matches, if any."""
    for bug, hint in BUGS:
        if np.allclose(got, _weights(qweight, scales, bug), rtol=1e-6, atol=0):
            return hint
    return HINT


def backend(sub: Submission) -> Any:
    from nanoserve.kernels import get_backend

    return get_backend(sub.path)


def property_suite(sub: Submission) -> str:
    from nanoserve.check_kernels import build_case, check_kernel

    report = check_kernel(backend(sub), "linear_int4", limits=LIMITS, max_examples=30 if sub.quick else 150, seed=0)
    if report.status == "ref":
        raise CriterionFailed("linear_int4 is missing: the reference was used", "define linear_int4 in your file")
    if not report.passed:
        problem = report.problem or ""
        if "NotImplementedError" in problem and "Lab 08" in problem:
            raise NotImplementedError(problem.split("NotImplementedError: ", 1)[1])
        hint = HINT
        if report.failing_example is not None:
            x, qweight, scales = build_case("linear_int4", report.failing_example)
            try:
                hint = diagnose(sub.module.linear_int4(x, qweight, scales), x, qweight, scales)
            except Exception:
                hint = HINT
        raise CriterionFailed(report.describe_failure(), hint)
    return f"linear_int4 agrees with the reference on {report.examples} examples (rows 0..32, groups of 2..32 columns; largest error {report.worst_ratio:.2f} of the tolerance)"


# --- invariants ------------------------------------------------------------------------------------


def _result(name: str, out: Any, shape: tuple) -> np.ndarray:
    out = np.asarray(out)
    if out.shape != shape or out.dtype != np.float32:
        raise CriterionFailed(f"{name} returned {out.dtype}{list(out.shape)}, expected float32{list(shape)}", HINT)
    return out


def _layout(m: Any) -> None:
    """One hand-packed row: bytes 0x1F, 0x80 with scales 2.0 and 0.5 (groups of 2 columns)."""
    qweight = np.array([[0x1F, 0x80]], dtype=np.uint8)
    scales = np.array([[2.0, 0.5]], dtype=np.float32)
    want = np.array([[14.0, -14.0, -4.0, 0.0]], dtype=np.float32)  # (15-8)*2, (1-8)*2, (0-8)*.5, (8-8)*.5
    got = _result("dequantize_int4", m.dequantize_int4(qweight, scales), (1, 4))
    if not np.array_equal(got, want):
        raise CriterionFailed(f"dequantize_int4(bytes [0x1F, 0x80], scales [2, 0.5]) = {got[0].tolist()}, expected {want[0].tolist()}", diagnose_weights(got, qweight, scales))
    y = _result("linear_int4", m.linear_int4(np.eye(4, dtype=np.float32), qweight, scales), (4, 1))
    if not np.allclose(y[:, 0], want[0], atol=1e-6):
        raise CriterionFailed(f"linear_int4(identity, bytes [0x1F, 0x80], scales [2, 0.5]) gave the column {y[:, 0].tolist()}, expected {want[0].tolist()}", diagnose(y, np.eye(4, dtype=np.float32), qweight, scales))


def _round_trip(m: Any, rng: np.random.Generator) -> None:
    w = rng.standard_normal((6, 64)).astype(np.float32)
    w[2] = 0.0  # an all-zero row: its scale must stay finite
    qweight, scales = m.quantize_int4(w, 16)
    qweight, scales = np.asarray(qweight), np.asarray(scales)
    if qweight.dtype != np.uint8 or qweight.shape != (6, 32) or scales.dtype != np.float32 or scales.shape != (6, 4):
        raise CriterionFailed(f"quantize_int4(w [6, 64], 16) returned {qweight.dtype}{list(qweight.shape)}, {scales.dtype}{list(scales.shape)}; expected uint8[6, 32], float32[6, 4]", "two columns per byte; one scale per group of 16 columns")
    back = _result("dequantize_int4", m.dequantize_int4(qweight, scales), w.shape)
    step = np.repeat(scales, 16, axis=1)
    if not np.all(np.isfinite(back)) or np.any(np.abs(back - w) > step / 2 + 1e-6):
        worst = np.unravel_index(np.argmax(np.abs(back - w) - step / 2), w.shape)
        raise CriterionFailed(f"dequantize(quantize(w)) is {back[worst]:.4g} at {tuple(map(int, worst))} where w is {w[worst]:.4g}: more than half a step ({step[worst] / 2:.3g}) away", "scale = max|w| / 7 per group, q = round(w / scale) + 8")
    again_q, again_s = (np.asarray(a) for a in m.quantize_int4(back, 16))
    if not np.array_equal(again_q, qweight) or not np.allclose(again_s, scales, rtol=1e-6, atol=0):
        raise CriterionFailed("quantizing the dequantized matrix again changed its bytes or scales (pack and unpack must be inverses)", HINT)
    try:
        m.quantize_int4(w[:, :40], 16)
    except NotImplementedError:
        raise
    except Exception:
        pass
    else:
        raise CriterionFailed("quantize_int4(w [6, 40], group_size=16) returned, though 40 columns are not whole groups of 16", "raise a ValueError naming in_features and the group size")


def _zeros_and_linearity(m: Any, rng: np.random.Generator) -> None:
    x = rng.standard_normal((5, 64)).astype(np.float32)
    qweight = rng.integers(0, 256, (7, 32)).astype(np.uint8)
    scales = (rng.random((7, 8)) * 0.05 + 0.01).astype(np.float32)  # groups of 8 columns
    y = _result("linear_int4", m.linear_int4(x, qweight, np.zeros_like(scales)), (5, 7))
    if np.any(y != 0):
        raise CriterionFailed("with every scale 0 the output must be exactly 0", "every weight is (q - 8) * scale")
    one_off = scales.copy()
    one_off[:, 3] = 0.0  # group 3: columns 24..31 contribute nothing
    masked = x.copy()
    masked[:, 24:32] = 0.0
    got = _result("linear_int4", m.linear_int4(x, qweight, one_off), (5, 7))
    if not np.allclose(got, kernels_ref.linear_int4(masked, qweight, scales), rtol=1e-4, atol=1e-5):
        raise CriterionFailed("with group 3's scales set to 0, columns 24..31 must drop out of the output (groups of 8 columns)", HINT_PER_ROW)
    eights = np.full_like(qweight, 0x88)
    if np.any(_result("linear_int4", m.linear_int4(x, eights, scales), (5, 7)) != 0):
        raise CriterionFailed("every nibble 8 (bytes 0x88) must give an output of exactly 0", HINT_NO_ZERO)
    x2 = rng.standard_normal((5, 64)).astype(np.float32)
    a, b = np.float32(1.5), np.float32(-0.25)
    lhs = np.asarray(m.linear_int4(a * x + b * x2, qweight, scales), dtype=np.float64)
    rhs = a * np.asarray(m.linear_int4(x, qweight, scales), dtype=np.float64) + b * np.asarray(m.linear_int4(x2, qweight, scales), dtype=np.float64)
    magnitude = (np.abs(a * x) + np.abs(b * x2)).astype(np.float64) @ np.abs(kernels_ref.dequantize_int4(qweight, scales)).T
    if np.any(np.abs(lhs - rhs) > 1e-5 + 1e-4 * magnitude):
        raise CriterionFailed("linear_int4(1.5 x - 0.25 x2) is not 1.5 linear_int4(x) - 0.25 linear_int4(x2): the output must be linear in x", "nothing may depend on x but the dot products")
    _result("linear_int4", m.linear_int4(np.zeros((0, 64), np.float32), qweight, scales), (0, 7))
    before = (x.copy(), qweight.copy(), scales.copy())
    m.linear_int4(x, qweight, scales)
    if not all(np.array_equal(u, v) for u, v in zip(before, (x, qweight, scales), strict=True)):
        raise CriterionFailed("linear_int4 modified its input (kernels must not)", "compute into new arrays")


def invariants(sub: Submission) -> str:
    m, rng = sub.module, np.random.default_rng(8)
    _layout(m)
    _round_trip(m, rng)
    _zeros_and_linearity(m, rng)
    return "the packing layout, the quantize/dequantize round trip, zero scales and codes of 8 give 0, linear in x, float32 for 0 rows, inputs untouched"


# --- integration and counters: the engine on the int4 model ----------------------------------------


@dataclasses.dataclass
class WeightReads:
    """What the engine's int4 linears were handed: calls, input rows, and weight bytes."""

    calls: int = 0
    rows: int = 0
    int4_bytes: int = 0  # qweight + scales
    fp32_bytes: int = 0  # the same matrices in float32
    weights: int = 0

    def as_tuple(self) -> tuple[int, int, int]:
        return self.calls, self.rows, self.int4_bytes


def counting_backend(name: str, kernel: Any, reads: WeightReads) -> str:
    """Register a backend ``name`` whose linear_int4 is ``kernel``, counting what it is handed."""
    from nanoserve.kernels import register_backend

    def linear_int4(x: Any, qweight: Any, scales: Any) -> Any:  # [T, in], uint8 [out, in/2], [out, G] -> [T, out]
        reads.calls += 1
        reads.rows += int(x.shape[0])
        reads.int4_bytes += int(qweight.nbytes + scales.nbytes)
        reads.fp32_bytes += 4 * int(qweight.shape[0]) * 2 * int(qweight.shape[1])
        reads.weights += int(qweight.shape[0]) * 2 * int(qweight.shape[1])
        return kernel(x, qweight, scales)

    register_backend(name, types.SimpleNamespace(linear_int4=linear_int4))
    return name


def int4_model(sub: Submission) -> Any:
    """The submission's model loaded again with ``--weights int4`` (kept for the later criteria)."""
    from nanoserve.model import load_checkpoint

    if "int4" not in sub.scratch:
        sub.scratch["int4"] = load_checkpoint(sub.loaded.path, "int4")
    return sub.scratch["int4"]


def integration(sub: Submission) -> str:
    if sub.loaded is None:
        raise CriterionFailed("no model to serve (pass --model)")
    model = int4_model(sub)
    want_reads, got_reads = WeightReads(), WeightReads()
    want = run_engine(model, backend=counting_backend("lab08-reference", kernels_ref.linear_int4, want_reads))
    got = run_engine(model, backend=counting_backend("lab08-student", backend(sub).kernels.linear_int4, got_reads))
    detail = compare_tokens(got, want)
    sub.scratch["counters"] = (got_reads, want_reads, got.num_steps, want.num_steps)
    return detail + f" ({got_reads.calls} calls of your linear_int4 on the --weights int4 model)"


def counters(sub: Submission) -> str:
    if "counters" not in sub.scratch:
        raise CriterionFailed("needs the integration runs, which failed")
    got, want, got_steps, want_steps = sub.scratch["counters"]
    if got.as_tuple() != want.as_tuple() or got_steps != want_steps:
        raise CriterionFailed(f"(calls, rows, int4 bytes) = {got.as_tuple()} in {got_steps} steps, the reference's {want.as_tuple()} in {want_steps}", "every linear layer must go through linear_int4 once per step")
    per_pass, fp32_per_pass = got.int4_bytes / got_steps, got.fp32_bytes / got_steps
    return (
        f"one forward pass reads {per_pass / 1024:.1f} KiB of int4 weights (qweight + scales, "
        f"{got.int4_bytes / got.weights:.3f} bytes/weight) against {fp32_per_pass / 1024:.1f} KiB in float32: "
        f"{got.fp32_bytes / got.int4_bytes:.2f}x fewer, as the reference's run ({got.calls} calls in {got_steps} steps)"
    )


# --- speed (not graded) ----------------------------------------------------------------------------


def _best(fn: Any, *args: Any, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def speed(sub: Submission) -> str:
    """A [1536, 576] int4 matrix (groups of 32) at 1 and 16 rows: the student's kernel, the
    reference, and float32 ``x @ W.T``; and the temporary memory of one 1-row call."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((1536, 576)).astype(np.float32) * 0.05
    packed = formats.quantize_int4(w, 32)
    qweight, scales = packed.arrays
    w32 = kernels_ref.dequantize_int4(qweight, scales)
    student = sub.module.linear_int4
    parts = []
    for rows in (1, 16):
        x = rng.standard_normal((rows, 576)).astype(np.float32)
        student(x, qweight, scales)  # a Numba version compiles here, not in the timing
        mine, ref = _best(student, x, qweight, scales), _best(kernels_ref.linear_int4, x, qweight, scales)
        fp32 = _best(lambda a: a @ w32.T, x)
        parts.append(f"T={rows}: {1e3 * mine:.3f} ms ({mine / ref:.2f}x ref, {mine / fp32:.2f}x fp32 matmul)")
    x = rng.standard_normal((1, 576)).astype(np.float32)
    tracemalloc.start()
    student(x, qweight, scales)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    parts.append(f"one 1-row call allocates {peak / 1024:.0f} KiB of NumPy arrays (its output is {4 * qweight.shape[0] / 1024:.0f} KiB, the float32 matrix {w32.nbytes / 1024:.0f} KiB)")
    return "; ".join(parts)


CRITERIA = [
    Criterion("signatures", "quantize_int4, dequantize_int4, linear_int4 take the reference's parameters", signatures, gate=True),
    Criterion("imports", "no kernels_ref, kernels_cpu, kernels_cuda, nanoserve.kernels or nanoserve.quant", imports, gate=True),
    Criterion("property", "the kernel suite on linear_int4 (rows 0..32, groups 2..32) against the reference", property_suite, points=40),
    Criterion("invariants", "packing layout, quantize round trip, zero scales and codes of 8, linearity in x, dtypes", invariants, points=20),
    Criterion("integration", "the engine on the --weights int4 model with your linear_int4: greedy tokens equal the reference's", integration, points=30),
    Criterion("counters", "weight bytes read per forward pass equal the reference run's, against float32", counters, points=10),
]

LAB = Lab("08", "quantized_linear", "a fused quantized linear: int4 group-wise weights", "kernels_ref.linear_int4", tuple(CRITERIA), speed)
