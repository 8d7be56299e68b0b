"""benchmarks/mixdit_fakequant.py on a CPU: every operand's split equals its definition, and the table sums per step."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("mixdit_fakequant", os.path.join(ROOT, "benchmarks", "mixdit_fakequant.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_checks_every_operand_and_sums_the_step():
    mb = _bench()
    res = mb.run(batch=1, reps=1, inner=2, tiny=True)
    assert [r["operand"] for r in res["rows"]] == list(mb.operands(1))
    assert all(r["split_equals_masked"] for r in res["rows"])
    for name in ("copy", "mx6", "mask sorted", "mask unrolled", "split masked", "split"):
        want = sum(r["times"][name] * r["sites"] * mb.DEPTH for r in res["rows"])
        assert abs(res["per_step"][name] - want) <= 1e-9 * max(1.0, want)
    md = mb.render(res)
    assert "| **per step** (× 28 blocks) |" in md and md.count("\n| ") == 1 + len(res["rows"]) + 1
    assert mb.operands(64)["fc2 in"][0] == (64, 256, 4608) and mb.operands(64)["p"][0] == (64, 16, 256, 256)
