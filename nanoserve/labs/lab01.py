"""Lab 01's grader: the pointwise kernels rms_norm, rope, silu_mul and softmax.

The student's file is used as a kernel backend (:func:`nanoserve.kernels.get_backend` by
path): the four kernels come from it and every other kernel falls back to the reference.

    property     the kernel suite (nanoserve.check_kernels) on each of the four, with the
                 shrunk failing example and a hint for the kernel that failed
    invariants   what each kernel must keep whatever the tolerance: shape and float32 dtype,
                 softmax rows that sum to 1, rope that keeps each head's length and is the
                 identity at position 0, rms_norm with unit gain giving unit RMS
    integration  the real engine on the student's backend: greedy tokens equal the reference's
    speed        each kernel's time against the reference's on one larger input
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import kernels_ref
from nanoserve.labs.common import check_imports, check_signatures, compare_tokens, load_module, run_engine
from nanoserve.labs.grader import Criterion, CriterionFailed, Lab, Submission

KERNELS = ("rms_norm", "rope", "silu_mul", "softmax")

HINTS = {
    "rms_norm": "the mean of x**2 is over the last axis, divided by d (not d - 1), and eps goes inside the sqrt",
    "rope": "rotate halves: out[:D/2] = x1*cos - x2*sin, out[D/2:] = x2*cos + x1*sin, angle pos * theta**(-2i/D) computed in float64",
    "silu_mul": "silu(g) = g / (1 + exp(-g)); exp(-g) overflows to inf for very negative g, which is the right limit",
    "softmax": "subtract the row max before exp, sum along the given axis, keep the dims so the division broadcasts",
}


def signatures(sub: Submission) -> str:
    module = load_module(sub, "lab01")
    return check_signatures(module, {k: getattr(kernels_ref, k) for k in KERNELS})


def imports(sub: Submission) -> str:
    detail = check_imports(sub.path, ("kernels_ref", "kernels_cpu", "kernels_cuda", "nanoserve.kernels", "nanoserve.check_kernels"), {})
    for k in KERNELS:
        if getattr(getattr(sub.module, k), "__module__", "").startswith("kernels_"):
            raise CriterionFailed(f"{k} is the reference's own function", "write it yourself")
    return detail


def backend(sub: Submission) -> Any:
    from nanoserve.kernels import get_backend

    return get_backend(sub.path)


def property_suite(sub: Submission) -> str:
    from nanoserve.check_kernels import check_kernel

    examples = 12 if sub.quick else 60
    be = backend(sub)
    total = 0
    for k in KERNELS:
        report = check_kernel(be, k, max_examples=examples, seed=0)
        total += report.examples
        if not report.passed:
            problem = report.problem or ""
            if "NotImplementedError" in problem and "Lab 01" in problem:
                raise NotImplementedError(problem.split("NotImplementedError: ", 1)[1])
            raise CriterionFailed(report.describe_failure(), HINTS[k])
    return f"{len(KERNELS)} kernels agree with the reference on {total} examples (edge cases first)"


def _near(a: np.ndarray, b: Any, what: str, kernel: str) -> None:
    if not np.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise CriterionFailed(f"{kernel}: {what} (largest gap {float(np.max(np.abs(a - b))):.3g})", HINTS[kernel])


def _shape_dtype(kernel: str, out: Any, shape: tuple) -> np.ndarray:
    out = np.asarray(out)
    if out.shape != shape or out.dtype != np.float32:
        raise CriterionFailed(f"{kernel} returned {out.dtype}{list(out.shape)}, expected float32{list(shape)}", HINTS[kernel])
    return out


def invariants(sub: Submission) -> str:
    m, rng = sub.module, np.random.default_rng(1)
    x = rng.standard_normal((5, 32)).astype(np.float32) * 3
    y = _shape_dtype("rms_norm", m.rms_norm(x, np.ones(32, np.float32), 1e-6), x.shape)
    _near(np.sqrt(np.mean(y.astype(np.float64) ** 2, axis=-1)), 1.0, "rows of rms_norm(x, w=1) must have RMS 1", "rms_norm")
    q = rng.standard_normal((4, 3, 16)).astype(np.float32)
    r = _shape_dtype("rope", m.rope(q, np.array([0, 1, 7, 300]), 10000.0), q.shape)
    _near(np.linalg.norm(r, axis=-1), np.linalg.norm(q, axis=-1), "a rotation must keep each head vector's length", "rope")
    _near(r[0], q[0], "position 0 must be the identity", "rope")
    g = rng.standard_normal((3, 8)).astype(np.float32)
    s = _shape_dtype("silu_mul", m.silu_mul(np.zeros_like(g), g), g.shape)
    _near(s, 0.0, "silu(0) * up must be 0", "silu_mul")
    logits = (rng.standard_normal((4, 50)) * 30).astype(np.float32)
    p = _shape_dtype("softmax", m.softmax(logits), logits.shape)
    if (p < 0).any() or not np.isfinite(p).all():
        raise CriterionFailed("softmax gave a negative or non-finite probability", HINTS["softmax"])
    _near(p.sum(axis=-1), 1.0, "softmax rows must sum to 1", "softmax")
    cols = _shape_dtype("softmax", m.softmax(logits, axis=0), logits.shape)
    _near(cols.sum(axis=0), 1.0, "softmax(x, axis=0) columns must sum to 1", "softmax")
    for name, args in (("rms_norm", (x, np.ones(32, np.float32), 1e-6)), ("softmax", (logits,))):
        before = [a.copy() for a in args if isinstance(a, np.ndarray)]
        getattr(m, name)(*args)
        if any(not np.array_equal(a, b) for a, b in zip(before, [a for a in args if isinstance(a, np.ndarray)], strict=True)):
            raise CriterionFailed(f"{name} modified its input (kernels must not)", "compute into a new array")
    return "shapes, dtypes, unit RMS, norm-preserving rope, rows summing to 1, inputs untouched"


def integration(sub: Submission) -> str:
    if sub.loaded is None:
        raise CriterionFailed("no model to serve (pass --model)")
    want = run_engine(sub.loaded, backend="ref")
    got = run_engine(sub.loaded, backend=sub.path)
    return compare_tokens(got, want) + " (student's kernels, reference for the rest)"


def speed(sub: Submission) -> str:
    """Each kernel's time on one larger input against the reference's (best of 5)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, 2048)).astype(np.float32)
    heads = rng.standard_normal((256, 8, 64)).astype(np.float32)
    args = {
        "rms_norm": (x, np.ones(2048, np.float32), 1e-5),
        "rope": (heads, np.arange(256), 10000.0),
        "silu_mul": (x, x),
        "softmax": (x,),
    }
    parts = []
    for k in KERNELS:
        times = []
        for fn in (getattr(sub.module, k), getattr(kernels_ref, k)):
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                fn(*args[k])
                best = min(best, time.perf_counter() - start)
            times.append(best)
        parts.append(f"{k} {1e3 * times[0]:.2f} ms ({times[0] / times[1]:.2f}x ref)")
    return ", ".join(parts)


CRITERIA = [
    Criterion("signatures", "rms_norm, rope, silu_mul, softmax take the reference's parameters", signatures, gate=True),
    Criterion("imports", "no kernels_ref, kernels_cpu, kernels_cuda or nanoserve.kernels", imports, gate=True),
    Criterion("property", "the kernel suite on the four kernels, against the reference", property_suite, points=50),
    Criterion("invariants", "shape, dtype and the mathematical invariants of each kernel", invariants, points=20),
    Criterion("integration", "the real engine on the student's kernels: greedy tokens equal the reference's", integration, points=30),
]

LAB = Lab("01", "pointwise_kernels", "pointwise kernels: rms_norm, rope, silu_mul, softmax", "kernels_ref", tuple(CRITERIA), speed)
