"""Test-session hooks: record which channel rules the rule tests (tests/test_rules_*.py) run, for
tests/test_rule_coverage.py; keep the opt-in tests (benchmark cache, sanitizer) out unless -m names them."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import recording_rule_lookups

RULE_TEST_PREFIX = "test_rules_"
RULE_TEST_FILES = {p.name for p in Path(__file__).parent.glob(RULE_TEST_PREFIX + "*.py")}
COVERAGE_FILE = "test_rule_coverage.py"
OPT_IN_MARKERS = ("benchmark_cache", "sanitize")


class RuleCoverage:
    """Op types whose rule ran during the rule tests of this session, and whether every rule test ran."""

    def __init__(self):
        self.ops: dict[str, set[str]] = {}  # op -> node ids of the rule tests that ran its rule
        self.expected: set[str] = set()     # node ids of the selected rule tests
        self.ran: set[str] = set()
        self.deselected = 0

    def complete(self) -> bool:
        """Every rule test file collected, none of its tests deselected, and all of them run."""
        files = {nodeid.split("::")[0].rsplit("/", 1)[-1] for nodeid in self.expected}
        return files == RULE_TEST_FILES and not self.deselected and self.expected <= self.ran


_COVERAGE = RuleCoverage()


def _is_rule_test(item) -> bool:
    return item.path.name.startswith(RULE_TEST_PREFIX)


def pytest_deselected(items):
    _COVERAGE.deselected += sum(_is_rule_test(i) for i in items)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    # Runs after -k/-m deselection.
    # Opt-in tests (the prepared fidelity-benchmark cache, the sanitizer build) run only when -m names their
    # marker, so that any other expression (-m "not slow") leaves them out as the plain run does.
    for marker in OPT_IN_MARKERS:
        if marker in (config.option.markexpr or ""):
            continue
        opted_out = [i for i in items if i.get_closest_marker(marker)]
        if opted_out:
            config.hook.pytest_deselected(items=opted_out)
            items[:] = [i for i in items if not i.get_closest_marker(marker)]
    # The coverage checks run last, once the rule tests have recorded what they ran.
    _COVERAGE.expected = {i.nodeid for i in items if _is_rule_test(i)}
    items.sort(key=lambda i: i.path.name == COVERAGE_FILE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if not _is_rule_test(item):
        yield
        return
    with recording_rule_lookups() as seen:
        yield
    _COVERAGE.ran.add(item.nodeid)
    for op in seen:
        _COVERAGE.ops.setdefault(op, set()).add(item.nodeid)


@pytest.fixture
def rule_coverage() -> RuleCoverage:
    return _COVERAGE
