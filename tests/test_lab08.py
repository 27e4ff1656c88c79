"""Lab 08 (the int4 group-wise linear): the reference scores full marks, the stub scores
zero, and the three classic int4 bugs fail the property suite with a hint that names them."""

from __future__ import annotations

import inspect
import re

import pytest

import kernels_ref
from nanoserve.labs.grader import FAIL, NOT_RUN, PASS
from nanoserve.labs.lab08 import LAB
from nanoserve.labs.registry import grade
from nanoserve.quant import formats
from tests.lab_helpers import mutate, write


def reference_source() -> str:
    """nanoserve's own quantizer, dequantizer and kernel, as a student file returning tuples."""
    quantize = inspect.getsource(formats.quantize_int4).replace('return QuantizedWeight("int4", (packed, scale), w.shape)', "return packed, scale")
    assert "return packed, scale" in quantize
    header = "from __future__ import annotations\n\nimport numpy as np\n\nfrom nanoserve.errors import UnsupportedModelError\n\nINT4_GROUP_SIZE = 32\n\n\n"
    return header + "\n\n".join([quantize, inspect.getsource(kernels_ref.dequantize_int4), inspect.getsource(kernels_ref.linear_int4)])


def test_the_reference_adapted_to_the_stub_scores_full_marks(tmp_path, tiny_loaded):
    report = grade(LAB, write(tmp_path, reference_source()), tiny_loaded, quick=True)
    assert [r.status for r in report.results] == [PASS] * len(report.results), report.to_json()
    assert report.score == report.max_score == 100 and report.exit_code == 0
    assert "6.40x fewer" in report.result("counters").detail and "x ref" in report.speed and "fp32 matmul" in report.speed
    assert int(re.search(r"allocates (\d+) KiB", report.speed).group(1)) > 3456  # it builds the float32 matrix


def test_the_untouched_stub_scores_zero_with_the_labs_message(tiny_loaded):
    report = grade(LAB, LAB.stub, tiny_loaded, quick=True)
    assert report.score == 0 and report.exit_code == 1
    assert all(r.status == FAIL for r in report.results if r.max_points)
    for name in ("property", "invariants", "integration"):
        assert "not implemented yet (Lab 08: write" in report.result(name).detail
    assert "Traceback" not in report.to_json()


PLANTED_BUGS = {
    "nibbles swapped": ("    q[:, 0::2] = qweight & 0x0F\n    q[:, 1::2] = qweight >> 4\n", "    q[:, 0::2], q[:, 1::2] = qweight >> 4, qweight & 0x0F\n", "LOW nibble"),
    "one scale per row": ("* scales[:, :, None]", "* scales[:, :1, None]", "one scale per row"),
    "zero point kept": ("q = (q - 8.0).reshape(", "q = q.reshape(", "zero point"),
}


@pytest.mark.parametrize("bug", sorted(PLANTED_BUGS))
def test_a_planted_int4_bug_fails_the_property_suite_and_the_hint_names_it(tmp_path, tiny_loaded, bug):
    old, new, hint = PLANTED_BUGS[bug]
    report = grade(LAB, write(tmp_path, mutate(reference_source(), old, new)), tiny_loaded, quick=True)
    assert report.failed[0] == "property" and report.exit_code == 1
    result = report.result("property")
    assert result.detail.startswith("linear_int4 FAILED") and "minimal failing example" in result.detail
    assert hint in result.hint
    assert "invariants" in report.failed and "integration" in report.failed


def test_a_file_importing_the_reference_kernel_is_not_graded_further(tmp_path, tiny_loaded):
    path = write(tmp_path, "from nanoserve.quant.formats import quantize_int4\nfrom kernels_ref import dequantize_int4, linear_int4\n")
    report = grade(LAB, path, tiny_loaded, quick=True)
    assert report.failed == ["imports"] and all(r.status == NOT_RUN for r in report.results[2:])
    assert "nanoserve.quant.formats" in report.result("imports").detail and report.score == 0


FUSED_KERNEL = '''

import numba


@numba.njit(cache=False)
def _rows(x, qweight, scales, out):  # [T, in], uint8 [out, in/2], [out, G] -> out [T, out] written
    group = x.shape[1] // scales.shape[1]
    for o in range(qweight.shape[0]):
        for t in range(x.shape[0]):
            acc = np.float32(0.0)
            for k in range(qweight.shape[1]):
                byte = np.int32(qweight[o, k])
                c = 2 * k
                acc += np.float32((byte & 0xF) - 8) * scales[o, c // group] * x[t, c]
                acc += np.float32((byte >> 4) - 8) * scales[o, (c + 1) // group] * x[t, c + 1]
            out[t, o] = acc


def linear_int4(x, qweight, scales):  # [T, in], uint8 [out, in/2], [out, G] -> [T, out]
    out = np.empty((x.shape[0], qweight.shape[0]), dtype=np.float32)
    _rows(np.ascontiguousarray(x, dtype=np.float32), qweight, scales, out)
    return out
'''


def test_a_fused_numba_kernel_that_never_builds_the_float_matrix_scores_full_marks(tmp_path, tiny_loaded):
    """The optional task: the bytes read in place; one decode call allocates only its output."""
    source = reference_source().replace("def linear_int4(", "def unused_linear_int4(") + FUSED_KERNEL
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.score == 100, report.to_json()
    allocated = int(re.search(r"allocates (\d+) KiB", report.speed).group(1))
    assert allocated <= 8, report.speed  # its 6 KiB output; the float32 matrix is 3456 KiB
