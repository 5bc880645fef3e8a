"""The op fuzzer at a small budget: every allow-listed op, no deaths by signal, no reads past a canary.

The full run is ``python -m benchmarks.fuzz_ops --cases 100000`` (specs/job-format.md §12 has the last figures).
"""

from __future__ import annotations

from dataclasses import replace

from p2pcompute.compute.interpreter import execute, tensor_to_blob
from p2pcompute.core.jobspec import ALLOWED_OPS, InputRef, NodeRef
from p2pcompute.testing.fuzz_ops import OPS, make_case, run_case, run_fuzz

SEED = 20261205
CASES_PER_OP = 8


def test_every_op_runs_a_few_adversarial_cases_without_a_crash_or_a_canary_read() -> None:
    report = run_fuzz(cases=len(OPS) * CASES_PER_OP, seed=SEED)
    assert set(report.per_op) == ALLOWED_OPS
    assert all(counts.total() == CASES_PER_OP for counts in report.per_op.values())
    assert report.count("crash") == 0 and report.count("canary") == 0, report.format()
    assert report.findings == [], report.format()
    # the cases reach the kernels: most ops run at least once, and the validators refuse some
    assert sum(1 for counts in report.per_op.values() if counts["ran"]) > len(OPS) * 3 // 4
    assert report.count("refused") > 0


def test_a_child_killed_by_a_signal_is_recorded_and_replaced() -> None:
    report = run_fuzz(cases=12, seed=SEED, start=len(OPS), selftest_signal=len(OPS) + 5)
    crashes = [f for f in report.findings if f.kind == "crash"]
    assert [(f.index, f.detail) for f in crashes] == [(len(OPS) + 5, "killed by SIGSEGV")]
    assert report.respawns == 1
    assert sum(counts.total() for counts in report.per_op.values()) == 12  # the cases after the crash ran too


def test_cases_are_reproducible_from_seed_and_index() -> None:
    for index in (0, 17, len(OPS) + 3):
        a, b = make_case(SEED, index), make_case(SEED, index)
        assert a.describe() == b.describe() and a.specs == b.specs and a.blobs == b.blobs
        assert a.op == OPS[index % len(OPS)]
    assert make_case(SEED, 1).describe() != make_case(SEED + 1, 1).describe()


def test_canaries_change_only_what_lies_outside_the_views() -> None:
    for index in range(0, 4 * len(OPS), 5):
        case = make_case(SEED, index)
        spec_a, spec_b = case.specs
        assert spec_a.nodes == spec_b.nodes
        if not spec_a.inputs:  # no tensor arguments (a mutation put a number in the only tensor slot)
            continue
        assert spec_a.inputs != spec_b.inputs
        op_node = spec_a.nodes[-1]
        views = tuple(
            item
            for arg in (*op_node.args, *(value for _, value in op_node.kwargs))
            for item in (arg if isinstance(arg, tuple) else (arg,))
            if isinstance(item, (InputRef, NodeRef))
        )
        if not views:
            continue
        # the views the op reads hold the same data under both canaries ...
        seen = [
            [tensor_to_blob(t)[1] for t in execute(replace(spec, nodes=spec.nodes[:-1], outputs=views), blobs)]
            for spec, blobs in zip(case.specs, case.blobs, strict=True)
        ]
        assert seen[0] == seen[1]
        # ... and the storages around them differ: a kernel reading past a view sees another value
        storages = [
            execute(replace(spec, nodes=(), outputs=(InputRef(0),)), blobs)[0]
            for spec, blobs in zip(case.specs, case.blobs, strict=True)
        ]
        assert tensor_to_blob(storages[0])[1] != tensor_to_blob(storages[1])[1]


def test_a_read_past_a_view_is_a_canary_finding() -> None:
    # a leaky "kernel": the graph returns the whole storage instead of the view, as an over-reading kernel would
    case = make_case(SEED, 3)
    leaky = [replace(spec, nodes=(), outputs=(InputRef(0),)) for spec in case.specs]
    case.specs = (leaky[0], leaky[1])
    outcome = run_case(case)
    assert outcome.kind == "canary" and "literally in an output: True" in outcome.detail
