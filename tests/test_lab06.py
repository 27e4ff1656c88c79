"""Lab 06 (the radix prefix cache): the reference scores full marks, the stub scores zero,
and planted bugs fail on the criterion they should, naming it."""

from __future__ import annotations

import inspect
import json

import pytest

from nanoserve import components
from nanoserve.cache import radix
from nanoserve.cache.block_pool import BlockPool
from nanoserve.labs.grader import FAIL, PASS
from nanoserve.labs.lab06 import LAB, Replay
from nanoserve.labs.registry import grade

HEADER = (
    "from __future__ import annotations\n\n"
    "import itertools\n"
    "from dataclasses import dataclass, field\n\n"
    "from nanoserve.interfaces import BlockAllocator, ComputedPrefix\n"
    "from nanoserve.stats import PrefixCacheStats\n\n\n"
)


def reference() -> str:
    """nanoserve's RadixCache (and its Node) as a student file."""
    return HEADER + inspect.getsource(radix.Node) + "\n\n" + inspect.getsource(radix.RadixCache)


def mutate(source: str, *replacements: tuple[str, str]) -> str:
    for old, new in replacements:
        assert source.count(old) == 1, f"the planted bug's target {old!r} is not once in the reference"
        source = source.replace(old, new)
    return source


def write(tmp_path, source: str) -> str:
    path = tmp_path / "student.py"
    path.write_text(source)
    return str(path)


def test_the_reference_adapted_to_the_stub_scores_full_marks(tmp_path, tiny_loaded):
    report = grade(LAB, write(tmp_path, reference()), tiny_loaded, quick=True)
    assert [r.status for r in report.results] == [PASS] * len(report.results), report.to_json()
    assert report.score == report.max_score == 100 and report.exit_code == 0
    counters = report.result("counters").detail
    assert "hit rate" in counters and "without a prefix cache" in counters and "saved)" in counters
    assert "x the reference" in report.speed


def test_the_untouched_stub_scores_zero_with_the_labs_message(tiny_loaded):
    report = grade(LAB, LAB.stub, tiny_loaded, quick=True)
    assert report.score == 0 and report.exit_code == 1
    graded = [r for r in report.results if r.max_points]
    assert [r.status for r in graded] == [FAIL] * len(graded)
    assert "not implemented yet (Lab 06: write RadixCache.__init__)" in report.result("property").detail
    assert "Traceback" not in report.to_json() and json.loads(report.to_json())["status"] == FAIL


def test_the_prefix_cache_seam_builds_a_class_from_a_file_path(tmp_path):
    path = write(tmp_path, reference())
    pool = BlockPool(8)
    cache = components.build("prefix_cache", f"{path}:RadixCache", pool, 4)
    assert type(cache).__name__ == "RadixCache" and type(cache) is not radix.RadixCache
    assert pool.evictor is cache


def test_a_match_ending_in_a_partial_block_fails_the_property_with_the_sequence(tmp_path, tiny_loaded):
    """Capping the match at len - 1 tokens, not at whole blocks: the last block is part-used."""
    source = mutate(
        reference(),
        ("limit = (len(tokens) - 1) // B * B  # whole blocks, and never the last token", "limit = len(tokens) // B * B"),
        ("return ComputedPrefix(blocks=blocks, num_tokens=matched, handle=node)", "return ComputedPrefix(blocks=blocks, num_tokens=min(matched, len(tokens) - 1), handle=node)"),
    )
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed[0] == "property"
    result = report.result("property")
    assert "not a whole number of blocks" in result.detail and "shortest failing sequence:" in result.detail
    assert "cache.match_prefix([" in result.detail and "whole blocks only" in result.hint
    assert "counters" in report.failed and "is not whole blocks" in report.result("counters").detail


def test_evicting_the_most_recently_used_leaf_fails_the_property_and_the_counters(tmp_path, tiny_loaded):
    source = mutate(reference(), ("leaf = min(leaves, key=lambda n: n.last_access)", "leaf = max(leaves, key=lambda n: n.last_access)"))
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed[0] == "property" and "counters" in report.failed
    assert "least recently used leaves first, it frees" in report.result("property").detail
    assert "(reference" in report.result("counters").detail


def test_evicting_a_locked_leaf_fails_the_property(tmp_path, tiny_loaded):
    source = mutate(reference(), ("if not n.children and n.lock_ref == 0]", "if not n.children]"))
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed[0] == "property"
    result = report.result("property")
    assert "which a lock protects" in result.detail and "cache.lock(" in result.detail and "lock_ref == 0" in result.hint


def test_an_unlock_that_stops_below_the_root_fails_the_property(tmp_path, tiny_loaded):
    source = mutate(reference(), ("        while node is not self.root:\n            assert node.lock_ref > 0", "        if node is not self.root:\n            assert node.lock_ref > 0"))
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed[0] == "property"
    result = report.result("property")
    assert "is locked, it should be unlocked" in result.detail and "cache.unlock(" in result.detail
    assert "up to the root" in result.hint


def test_a_check_invariants_that_checks_nothing_fails_only_the_invariants(tmp_path, tiny_loaded):
    source = mutate(reference(), ('        """Tree structure, lock counts', '        return\n        """Tree structure, lock counts'))
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed == ["invariants"]
    detail = report.result("invariants").detail
    assert "accepted a broken tree" in detail and "a lock count below zero" in detail


def test_importing_nanoserves_tree_is_not_graded_further(tmp_path, tiny_loaded):
    report = grade(LAB, write(tmp_path, "from nanoserve.cache.radix import Node, RadixCache\n"), tiny_loaded, quick=True)
    assert report.failed == ["imports"] and "nanoserve.cache.radix" in report.result("imports").detail


@pytest.mark.parametrize("seed", range(3))
def test_the_model_agrees_with_the_reference_on_long_random_sequences(seed):
    """The grader's model is right: the reference tree survives many long sequences."""
    import random

    rng = random.Random(seed)
    for _ in range(40):
        replay = Replay(radix.RadixCache, own_checks=True)
        for _ in range(60):
            op = rng.choice(["request", "request", "match", "unlock", "evict", "pressure"])
            replay.run(op, [rng.randint(1, 2) for _ in range(rng.randint(1, 11))], rng.randint(0, 8))
