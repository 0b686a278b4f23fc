"""Meta-test: every op type with a channel rule appears in at least one equivalence test model.

The per-rule tests live in tests/test_rules_*.py and build their graphs by hand. This test reads those sources
(statically: it does not depend on which tests ran, or in which order) and collects the op types they build:

- a string literal passed as the first argument (or as `op_type=`) to any call: `helper.make_node("Conv", ...)`,
  a local alias `mk("Relu", ...)`, a builder method `g.add("Concat", ...)`;
- a string literal inside a `pytest.mark.parametrize` argument list, or inside a module-level constant that list
  names (`UNARY_OPS = ("Relu", ...)`), for tests that build `make_node(op, ...)` from a parameter.

Ops that cannot be tested must be listed in UNTESTABLE with the reason; nothing is excluded silently.
"""
from __future__ import annotations

import ast
from pathlib import Path

import graphprune.ops  # noqa: F401  (registers every rule)
from graphprune.rules import RULES

TESTS = Path(__file__).resolve().parent

# op type -> why no equivalence test can run it. Keep this empty unless onnxruntime (or onnx) makes a test
# impossible; a listed op that some test does build is reported as stale.
UNTESTABLE: dict[str, str] = {}


def _strings(node):
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            yield sub.value


def _call_name(func) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def built_op_types(source: str) -> set[str]:
    tree = ast.parse(source)
    # module-level NAME = (...) lists, for parametrize(..., NAME)
    constants = {t.id: stmt.value for stmt in tree.body if isinstance(stmt, ast.Assign)
                 for t in stmt.targets if isinstance(t, ast.Name)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node.func)
        if name == "parametrize":
            for arg in node.args[1:]:
                found.update(_strings(arg))
                for sub in ast.walk(arg):
                    if isinstance(sub, ast.Name) and sub.id in constants:
                        found.update(_strings(constants[sub.id]))
            continue
        if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.add(node.args[0].value)
        for kw in node.keywords:
            if kw.arg == "op_type" and isinstance(kw.value, ast.Constant):
                found.add(kw.value.value)
    return found


def rule_test_files():
    return sorted(TESTS.glob("test_rules_*.py"))


def covered_op_types() -> dict[str, list[str]]:
    """op type -> test files that build it."""
    out: dict[str, list[str]] = {}
    for path in rule_test_files():
        for op in built_op_types(path.read_text()):
            out.setdefault(op, []).append(path.name)
    return out


def registered_op_types() -> set[str]:
    return {op if not domain else f"{domain}::{op}" for domain, op in RULES.op_types()}


def test_scanner_sees_the_usual_builders():
    src = '''
import pytest
from onnx import helper
mk = helper.make_node
a = helper.make_node("Conv", ["x", "w"], ["y"])
b = mk("Relu", ["y"], ["z"])
c = g.add("Concat", [a, b], axis=1)
d = helper.make_node(op_type="Softmax", inputs=["z"], outputs=["s"])
OPS = ("Tanh", "Erf")
@pytest.mark.parametrize("op,attrs", [("LRN", {"size": 3}), ("Sigmoid", {})])
@pytest.mark.parametrize("other", OPS)
def test_x(op, attrs, other):
    helper.make_node(op, ["x"], ["y"], **attrs)
'''
    assert {"Conv", "Relu", "Concat", "Softmax", "LRN", "Sigmoid", "Tanh", "Erf"} <= built_op_types(src)


def test_rule_test_files_exist():
    names = {p.name for p in rule_test_files()}
    assert "test_rules_layers.py" in names


def test_every_registered_rule_has_an_equivalence_case():
    covered = covered_op_types()
    registered = registered_op_types()
    missing = sorted(op for op in registered if op not in covered and op not in UNTESTABLE)
    assert not missing, (f"op types with a channel rule but no test model in tests/test_rules_*.py: {missing}; "
                         "add a case, or list the op in UNTESTABLE with the reason")


def test_untestable_list_is_current():
    covered = covered_op_types()
    registered = registered_op_types()
    stale = sorted(op for op in UNTESTABLE if op in covered or op not in registered)
    assert not stale, f"UNTESTABLE lists ops that are tested or have no rule: {stale}"
