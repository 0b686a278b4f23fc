"""Meta-test: every op type with a channel rule is run by at least one rule test (tests/test_rules_*.py).

tests/conftest.py records, while each rule test runs, the op types whose rule the analysis looked up and found
(`helpers.recording_rule_lookups`): an op counts as covered only when a test built it into a graph that
graphprune analysed, not when its name merely appears in a test file. The check runs after the rule tests
(conftest orders it last) and needs all of them in the same session.
"""
from __future__ import annotations

import pytest
from onnx import helper

import graphprune
import graphprune.ops  # noqa: F401  (registers every rule)
from graphprune.rules import RULES

from helpers import make_model, rand, recording_rule_lookups


def registered_op_types() -> set[str]:
    return {op if not domain else f"{domain}::{op}" for domain, op in RULES.op_types()}


def test_recorder_sees_the_rules_an_analysis_runs():
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 8, 4, 4])], {"w": rand(8, 3, 1, 1)})
    with recording_rule_lookups() as seen:
        graphprune.analyze_model(model)
    assert {"Conv", "Relu"} <= seen
    assert "Gemm" not in seen
    with recording_rule_lookups() as outside:
        pass
    assert not outside


def test_every_registered_rule_is_run_by_a_rule_test(rule_coverage):
    if not rule_coverage.complete():
        pytest.skip("needs every test of tests/test_rules_*.py in the same session (run the files together)")
    missing = sorted(registered_op_types() - set(rule_coverage.ops))
    assert not missing, f"op types with a channel rule that no test in tests/test_rules_*.py runs: {missing}"
