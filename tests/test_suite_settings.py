"""The test suite's own settings: nothing in it may fail because the machine is slow or loaded."""

import pytest


def test_hypothesis_has_no_deadline_in_any_test():
    """The conftest profile sets deadline=None; per-test ``@settings(...)`` inherit it (they are created after)."""
    hypothesis = pytest.importorskip("hypothesis")
    assert hypothesis.settings.default.deadline is None
    assert hypothesis.settings(max_examples=3).deadline is None
    assert hypothesis.settings.default.derandomize  # the same examples on every machine and run
