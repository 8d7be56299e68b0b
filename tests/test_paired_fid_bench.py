"""benchmarks/paired_fid.py: FIDs and paired FID differences between jdq eval run folders of the same noise."""

import json

import numpy as np
import pytest

from jdq.metrics import shards

N, SHARD = 60, 20


@pytest.fixture(scope="module")
def pf(load_benchmark):
    return load_benchmark("paired_fid")


def _settings(quant="", **over):
    return {"protocol": "animal-mnist", "sampler": "ddim", "steps": 15, "guidance": 1.5, "seed": 0,
            "samples": N, "shard_size": SHARD, "quant": quant, "calib_samples": 8 if quant else 0, **over}


def _run(folder, features, stop=None, **settings):
    """A run folder whose shards hold ``features`` (only the shards up to ``stop`` samples written)."""
    shards.prepare(folder, _settings(**settings))
    n = len(features)

    def make(a, b):
        if stop is not None and a >= stop:
            raise KeyboardInterrupt  # an interrupted run: the shards so far are kept
        return {"labels": np.arange(a, b) % 10, "animal": features[a:b]}
    try:
        shards.run(folder, n, SHARD, make, progress=False)
    except KeyboardInterrupt:
        pass
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An FP run and a 'quantized' one: the same samples plus a small perturbation (the same noise)."""
    from jdq.demo import animal_fid

    ref = animal_fid.load_reference().stats_of("animal")
    rng = np.random.default_rng(0)
    fp = (ref.mu + 2.0 * rng.standard_normal((N, ref.mu.shape[0]))).astype(np.float32)
    q = (fp + 0.05 * rng.standard_normal(fp.shape) + 0.3).astype(np.float32)
    root = tmp_path_factory.mktemp("runs")
    return {"fp": _run(root / "fp", fp), "q": _run(root / "q", q, quant="w8a8"), "fp_features": fp, "q_features": q,
            "ref": ref, "root": root}


def test_paired_difference_is_the_fid_difference_and_narrower(pf, runs, tmp_path):
    out = tmp_path / "o.json"
    assert pf.main([f"fp={runs['fp']}", f"q={runs['q']}", "--pair", "q", "fp", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["samples"] == N
    fid_q, fid_fp = r["runs"]["q"]["fid"], r["runs"]["fp"]["fid"]
    d = r["pairs"]["q − fp"]
    assert d["value"] == pytest.approx(fid_q["value"] - fid_fp["value"], rel=1e-6, abs=1e-6)
    assert d["method"].startswith("paired grouped jackknife")
    # the shared noise cancels: the paired interval is much narrower than either run's own
    assert (d["high"] - d["low"]) < 0.2 * (fid_q["high"] - fid_q["low"])
    assert d["low"] < d["value"] < d["high"]
    from jdq.metrics.evaluate import fid_delta_interval

    same = fid_delta_interval(runs["q_features"], runs["fp_features"], runs["ref"]).to_dict()
    assert d["value"] == pytest.approx(same["value"], rel=1e-9) and d["se"] == pytest.approx(same["se"], rel=1e-9)


def test_prefix_and_unfinished_runs(pf, runs, tmp_path):
    part = _run(runs["root"] / "part", runs["q_features"], stop=2 * SHARD, quant="w8a8-fp8attn")
    out = tmp_path / "o.json"
    pf.main([f"fp={runs['fp']}", f"part={part}", "--pair", "part", "fp", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["samples"] == 2 * SHARD  # the whole shards every run has
    from jdq.metrics.evaluate import fid_delta_interval

    want = fid_delta_interval(runs["q_features"][:2 * SHARD], runs["fp_features"][:2 * SHARD], runs["ref"])
    assert r["pairs"]["part − fp"]["value"] == pytest.approx(want.value, rel=1e-9)
    pf.main([f"fp={runs['fp']}", f"q={runs['q']}", "--samples", "30", "--out", str(out)])
    assert json.loads(out.read_text())["samples"] == 30  # inside a shard
    with pytest.raises(SystemExit, match="40 samples in whole shards"):
        pf.main([f"fp={runs['fp']}", f"part={part}", "--samples", "50"])


def test_runs_of_other_noise_are_refused(pf, runs):
    other = _run(runs["root"] / "seed1", runs["q_features"], quant="w8a8", seed=1)
    with pytest.raises(SystemExit, match="not paired: their settings differ in seed"):
        pf.main([f"fp={runs['fp']}", f"o={other}", "--pair", "o", "fp"])
    with pytest.raises(SystemExit, match="no run named 'x'"):
        pf.main([f"fp={runs['fp']}", "--pair", "x", "fp"])
