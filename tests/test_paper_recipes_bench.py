"""``benchmarks/paper_recipes_gpu.py --tiny``: every stage writes its fields; a spent budget skips stages by name."""

import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "paper_recipes_gpu.py")


def _bench():
    spec = importlib.util.spec_from_file_location("paper_recipes_gpu", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read(out):
    with open(out / "paper_recipes_gpu.json") as f:
        res = json.load(f)
    assert (out / "paper_recipes_gpu.md").read_text().startswith("jax ")
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())  # the writes are atomic renames
    return res


def test_spent_budget_skips_every_stage_but_the_bf16_step(tmp_path):
    bench = _bench()
    assert bench.main(["--tiny", "--budget-s", "0", "--iters", "1", "--out", str(tmp_path), "--recipes", "w8a8"]) == 0
    res = _read(tmp_path)
    st = res["stages"]
    assert set(st) == set(bench.STAGES) and res["tiny"] and res["batch"] == 2
    assert {n: r["status"] for n, r in st["calibration"]["recipes"].items()} == dict.fromkeys(bench.PAPER_RECIPES, "skipped")
    assert st["steps"]["times"]["bf16"]["status"] == "done" and st["steps"]["times"]["bf16"]["wall_ms"] > 0
    assert st["steps"]["times"]["w8a8"]["status"] == "skipped" and "budget" in st["steps"]["times"]["w8a8"]["reason"]
    assert st["eval"]["status"] == "skipped" and "budget" in st["eval"]["reason"]


def test_unknown_recipe_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown recipe 'nope'"):
        _bench().main(["--tiny", "--out", str(tmp_path), "--recipes", "nope"])


@pytest.mark.slow
def test_tiny_run_fills_every_stage(tmp_path):
    bench = _bench()
    assert bench.main(["--tiny", "--budget-s", "1e9", "--out", str(tmp_path), "--recipes", "w8a8,q-dit"]) == 0
    st = _read(tmp_path)["stages"]
    cal = st["calibration"]
    assert cal["status"] == "done" and cal["sampler"] == "ddpm 2 steps"
    for name in bench.PAPER_RECIPES:
        r = cal["recipes"][name]
        assert r["status"] == "done", r
        assert r["calibration_s"] > 0 and r["prepare_s"] >= 0 and r["memory"]["peak_bytes"] > 0
        assert r["calibration"]["samples"] == 2 and r["calibration"]["sampler_steps"] == 2
    times = st["steps"]["times"]
    assert st["steps"]["weights"].startswith("hoisted")  # timed as the sampler runs a step
    assert list(times) == ["bf16", "q-dit", "w8a8"]  # the paper recipes first
    for name in ("q-dit", "w8a8"):
        assert times[name]["status"] == "done" and times[name]["finite"], times[name]
        assert times[name]["ratio_vs_bf16"] > 0 and isinstance(times[name]["meets_goal"], bool)
    assert st["steps"]["worst"]["recipe"] in ("q-dit", "w8a8")
    ev = st["eval"]
    assert ev["status"] == "done" and ev["exit_code"] == 0 and (ev["samples"], ev["steps"]) == (8, 2)
    assert set(ev["metrics"]) == {"fid", "sfid", "is", "precision", "recall"}
    assert ev["extrapolated_10k_250_steps_s"] > ev["timing"]["sampling_s"]


def test_also_with_times_each_recipe_again_under_each_variable(tmp_path, monkeypatch):
    """``--also-with ENV=VALUE`` (repeatable) adds a row per recipe and variant compiled with the variable set, and
    restores the environment."""
    monkeypatch.delenv("JDQ_ACT_CAST", raising=False)
    monkeypatch.setenv("JDQ_TUNING", "")
    bench = _bench()
    assert bench.main(["--tiny", "--budget-s", "1e9", "--iters", "1", "--out", str(tmp_path), "--recipes", "mx6",
                       "--calib-recipes", "", "--skip-eval", "--also-with", "JDQ_ACT_CAST=kernel",
                       "--also-with", "JDQ_TUNING=quant_attention.stages=3"]) == 0
    times = _read(tmp_path)["stages"]["steps"]["times"]
    assert list(times) == ["bf16", "mx6 [JDQ_ACT_CAST=kernel]", "mx6 [JDQ_TUNING=quant_attention.stages=3]", "mx6"]
    assert all(r["status"] == "done" and r["finite"] for r in times.values()), times
    assert "JDQ_ACT_CAST" not in os.environ and os.environ["JDQ_TUNING"] == ""
    with pytest.raises(SystemExit, match="ENV=VALUE"):
        bench.main(["--tiny", "--out", str(tmp_path), "--also-with", "JDQ_ACT_CAST"])


def test_also_with_sets_several_variables_and_rounds_interleave(tmp_path, monkeypatch):
    """A variant of space-separated pairs sets them together; ``--rounds 3`` times every step three times in turn and
    takes each row's median of the rounds."""
    import statistics

    monkeypatch.delenv("JDQ_ACT_CAST", raising=False)
    monkeypatch.delenv("JDQ_ROW_SELECT", raising=False)
    bench = _bench()
    assert bench.main(["--tiny", "--budget-s", "1e9", "--iters", "1", "--out", str(tmp_path), "--recipes", "mx6",
                       "--calib-recipes", "", "--skip-eval", "--rounds", "3",
                       "--also-with", "JDQ_ACT_CAST=xla JDQ_ROW_SELECT=xla"]) == 0
    times = _read(tmp_path)["stages"]["steps"]["times"]
    assert list(times) == ["bf16", "mx6 [JDQ_ACT_CAST=xla JDQ_ROW_SELECT=xla]", "mx6"]
    for name, rec in times.items():
        assert len(rec["rounds_ms"]) == 3 and rec["wall_ms"] == statistics.median(rec["rounds_ms"]), rec
    assert times["mx6"]["ratio_vs_bf16"] == times["mx6"]["wall_ms"] / times["bf16"]["wall_ms"]
    assert "JDQ_ACT_CAST" not in os.environ and "JDQ_ROW_SELECT" not in os.environ
    with pytest.raises(SystemExit, match="--rounds"):
        bench.main(["--tiny", "--out", str(tmp_path), "--rounds", "0"])
    with pytest.raises(SystemExit, match="ENV=VALUE"):
        bench.main(["--tiny", "--out", str(tmp_path), "--also-with", "A=1 B"])
