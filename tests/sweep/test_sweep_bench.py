"""``benchmarks/sweep.py --device-run --tiny``: the throughput-per-point run writes its JSON and markdown table."""

import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks", "sweep.py")


@pytest.mark.slow
def test_device_run_tiny_writes_throughput_per_point(tmp_path):
    spec = importlib.util.spec_from_file_location("sweep_bench", _PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--device-run", "--tiny", "--out", str(tmp_path), "--max-chunk", "2"]) == 0
    res = json.loads((tmp_path / "sweep_device.json").read_text())
    assert res["plans"] == 4 and res["chunk"] == 2 and res["calls_per_sweep"] == 2
    assert res["vmapped_s_per_point"] > 0 and res["one_plan_s"] > 0
    assert res["throughput_speedup_per_point"] == pytest.approx(res["one_plan_s"] / res["vmapped_s_per_point"])
    md = (tmp_path / "sweep_device.md").read_text()
    assert "| vmapped, 2 plans per call |" in md and "Memory per point" in md
