"""benchmarks/mixdit_fakequant.py on a CPU: operands, the per-step sums and table; tiny runs of both modes (slow)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("mixdit_fakequant", os.path.join(ROOT, "benchmarks", "mixdit_fakequant.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_operands_table_and_bad_counts():
    mb = _bench()
    ops = mb.operands(64)
    assert ops["fc2 in"][0] == (64, 256, 4608) and ops["p"][0] == (64, 16, 256, 256) and ops["k^T"][1] == -2
    assert sum(sites for *_, sites in ops.values()) == 8  # the 4 linear inputs and the 4 attention operands
    rows = [{"operand": "a", "shape": [2, 3], "axis": -1, "sites": 3, "times": {"copy": 1.0, "split": 2.0},
             "split_equals_masked": True},
            {"operand": "b", "shape": [4], "axis": -1, "sites": 1, "times": {"copy": 0.5}, "split_equals_masked": True}]
    md = mb.render({"device": "d", "backend": "cpu", "jax": "x", "batch": 2, "inner": 3, "depth": 28, "rows": rows,
                    "per_step": {"copy": 98.0, "split": 168.0}})
    assert "| a | 2×3 (axis -1) | 3 | 1.000 | 2.000 | True |" in md and "| b | 4 (axis -1) | 1 | 0.500 | - | True |" in md
    assert "| **per step** (× 28 blocks) | | | **98.00** | - | |" in md  # a column missing in a row has no sum
    for bad in (["--batch", "0"], ["--reps", "0"], ["--step", "--inner", "0"]):
        with pytest.raises(SystemExit):
            mb.main(bad)


@pytest.mark.slow
def test_tiny_run_checks_every_operand_and_sums_the_step():
    mb = _bench()
    res = mb.run(batch=1, reps=1, inner=2, tiny=True)
    assert [r["operand"] for r in res["rows"]] == list(mb.operands(1))
    assert all(r["split_equals_masked"] for r in res["rows"])
    for name in ("copy", "mx6", "mask sorted", "mask unrolled", "split masked", "split"):
        want = sum(r["times"][name] * r["sites"] * mb.DEPTH for r in res["rows"])
        assert abs(res["per_step"][name] - want) <= 1e-9 * max(1.0, want)


@pytest.mark.slow
def test_step_mode_times_the_embedded_model(capsys):
    assert _bench().main(["--step", "--batch", "1"]) == 0
    assert "batch 1 + CFG: mixdit" in capsys.readouterr().out
