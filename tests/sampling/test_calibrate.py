"""Trajectory calibration: step selections, CFG halves, streaming accumulators, save and resume."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import spearmanr

from jdq.quant import QuantizerBase
from jdq.quant import calibrate as C
from jdq.sampling import collect_sampler_stats, ddim, ddpm, guided_output, initial_noise, sample_keys, step_noise
from tests.sampling import toy

SC = importlib.import_module("jdq.sampling.calibrate")  # the module (jdq.sampling.calibrate is also its function)

PARAMS = toy.init()
LABELS = jnp.array([0, 1, 2, 1, 0, 2], jnp.int32)
NULL = jnp.full((1,), toy.NUM_CLASSES, jnp.int32)
RANGE = ("absmax_channel", "min_channel", "max_channel", "absmax", "min", "max")


def _calibrate(settings, sampler=None, labels=LABELS, **kw):
    return SC.calibrate(toy.apply, PARAMS, sampler or ddim(5), labels, toy.SHAPE, settings, seed=3, **kw)


class _Recorder(QuantizerBase):
    def __init__(self):
        self.seen = {}

    def __call__(self, v, site, role, axis=-1):
        self.seen.setdefault(site + ":" + role, []).append(v)
        return v


def _inputs_per_step(sampler, labels, uncond=None, guidance=1.0):
    """The fc1 / fc2 inputs of every step, per sample: ``{role: [S, B(, 2), C]}`` (an unrolled loop)."""
    keys = sample_keys(3, labels.shape[0])
    x = initial_noise(keys, toy.SHAPE)
    fc1, fc2 = [], []
    for i in range(sampler.num_steps):
        t = jnp.full((x.shape[0],), sampler.timesteps[i], jnp.float32)
        rec = _Recorder()
        out = guided_output(toy.apply, PARAMS, x, t, labels, uncond, guidance, quant=rec, separate=True)
        seen = rec.seen
        b = x.shape[0]
        fc1.append(np.stack([np.asarray(v) for v in seen["fc1:act"]], 1).reshape(b, -1, 16))
        fc2.append(np.stack([np.asarray(v) for v in seen["fc2:post_gelu"]], 1).reshape(b, -1, 32))
        noise = step_noise(keys, i, toy.SHAPE) if sampler.stochastic else None
        x, _ = sampler.update(i, x, out, None, noise)
    return np.stack(fc1), np.stack(fc2)  # [S, B, rows per sample, C]


def test_every_step_equals_the_per_step_collector_bit_for_bit():
    s = ddim(5)
    _, old = collect_sampler_stats(toy.apply, PARAMS, s, LABELS, sample_keys(3, 6), toy.SHAPE, uncond=NULL,
                                   guidance=2.0)
    new = _calibrate(C.CalibrationSettings(batch_size=4), uncond=NULL, guidance=2.0)  # two chunks: 4 + 2
    assert set(new) == set(old)
    for key in old:
        for name in RANGE:
            np.testing.assert_array_equal(new[key][name], old[key][name])  # max / min: exact in any order
        np.testing.assert_array_equal(new[key]["step"], np.arange(5))


def test_uniform_steps_and_random_pairs_observe_exactly_their_selection():
    s = ddpm(8)
    fc1, _ = _inputs_per_step(s, LABELS)
    uni = _calibrate(C.CalibrationSettings(steps="uniform", num_steps=3), sampler=s)
    np.testing.assert_array_equal(uni["fc1:act"]["step"], [0, 4, 7])  # round(linspace(0, 7, 3))
    # the reference trajectory is an eager loop, the calibration's a compiled scan: XLA may fuse the sampler's
    # float32 updates differently, a few ulp per step over 8 steps (rtol 1e-5 ≫ 8 · 2⁻²³ · the updates' condition)
    tol = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(uni["fc1:act"]["absmax_channel"], np.abs(fc1[[0, 4, 7]]).max(axis=(1, 2)), **tol)
    settings = C.CalibrationSettings(steps="random", pairs=10, seed=5, batch_size=4)
    mask = C.selection_mask(settings, 8, 6)
    assert mask.sum() == 10
    rnd = _calibrate(settings, sampler=s)
    steps = np.flatnonzero(mask.any(1))
    np.testing.assert_array_equal(rnd["fc1:act"]["step"], steps)
    for slot, i in enumerate(steps):
        picked = fc1[i][mask[i]]  # only the selected samples of step i
        np.testing.assert_allclose(rnd["fc1:act"]["max_channel"][slot], picked.max(axis=(0, 1)), **tol)
        np.testing.assert_allclose(rnd["fc1:act"]["min"][slot], picked.min(), **tol)
        others = fc1[i][~mask[i]]
        if others.size and others.max() > picked.max() * (1 + 1e-3):  # an unselected sample would have shown
            assert float(rnd["fc1:act"]["max"][slot]) < others.max()
    with pytest.raises(ValueError, match="pairs"):
        C.selection_mask(C.CalibrationSettings(steps="random", pairs=49), 8, 6)


def test_hessian_histogram_and_cfg_halves():
    s = ddim(4)
    fc1, fc2 = _inputs_per_step(s, LABELS, NULL, 2.0)
    st = C.CalibrationSettings(stats=("range", "hist", "hessian"), batch_size=4)
    together = _calibrate(st, sampler=s, uncond=NULL, guidance=2.0)
    apart = _calibrate(C.CalibrationSettings(stats=("range", "hist", "hessian"), cfg="apart"), sampler=s,
                       uncond=NULL, guidance=2.0)
    rows = fc2.reshape(-1, 32).astype(np.float64)
    # Σ xxᵀ over every row of every step and both guidance halves; float32 sums of ≤ 48 products of |x| ≤ 1
    # (eager reference trajectory vs compiled scan, as above: rtol 1e-5 on the inputs, 2e-5 on their products)
    np.testing.assert_allclose(together["fc2:post_gelu"]["hessian"], rows.T @ rows, rtol=5e-5, atol=1e-4)
    assert float(together["fc2:post_gelu"]["rows"]) == rows.shape[0]
    for name in ("hessian", "rows", "hist") + RANGE:  # the statistics do not depend on how the halves run
        ref = np.asarray(together["fc1:act"][name])
        # float32 sums in another order: error ≤ n·2⁻²³·Σ|products| ≤ 1e-5 · max|H| for these 48 rows
        np.testing.assert_allclose(apart["fc1:act"][name], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert "hessian" not in together["fc1:weight"]
    # the histogram's percentile brackets numpy's within one bin (a factor 2^(1/4))
    hist = np.asarray(together["fc1:act"]["hist"]).sum(0)
    assert hist.sum() == fc1.size  # integer counts: exact
    for q in (50.0, 99.0, 100.0):
        exact = np.percentile(np.abs(fc1), q)
        got = float(C.percentile(hist, q))
        assert exact <= got * (1 + 1e-5) and got <= exact * 2 ** 0.25 * (1 + 1e-5)


def test_ssc_sums_are_the_softmax_of_minus_spearman_over_every_observed_sample():
    s = ddim(3)
    fc1, _ = _inputs_per_step(s, LABELS)
    st = _calibrate(C.CalibrationSettings(stats=("range", "ssc"), batch_size=4), sampler=s)
    w = np.abs(np.asarray(PARAMS["w1"])).max(axis=1)  # per input channel of the (in, out) weight
    x = np.abs(fc1).max(axis=2).reshape(-1, 16)  # one row per (step, sample): max over its tokens
    rho = np.array([spearmanr(r, w).statistic for r in x])
    expect = softmax(-rho) @ x  # adreamwu/PTQ4DiT's weighting, over all samples at once
    got = np.asarray(st["fc1:act"]["ssc_num"]).sum(0) / np.asarray(st["fc1:act"]["ssc_den"]).sum()
    np.testing.assert_allclose(got, expect, rtol=5e-5)  # inputs within 1e-5 (as above); ρ from ranks, exact


def test_interrupted_calibration_resumes_and_foreign_or_truncated_files_are_refused(tmp_path, monkeypatch):
    settings = C.CalibrationSettings(batch_size=2)
    full = _calibrate(settings)
    path = tmp_path / "stats.safetensors"
    real, calls = SC._trajectory_jit, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(SC, "_trajectory_jit", failing)
    with pytest.raises(KeyboardInterrupt):
        _calibrate(settings, path=path)
    stats, meta = C.load_stats(path)
    assert meta["chunks_done"] == 1 and meta["chunks"] == 3
    calls.clear()
    monkeypatch.setattr(SC, "_trajectory_jit", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = _calibrate(settings, path=path)
    assert len(calls) == 2  # only the two chunks left
    for key in full:
        for name in RANGE:
            np.testing.assert_array_equal(resumed[key][name], full[key][name])
    with pytest.raises(ValueError, match="other settings"):
        _calibrate(C.CalibrationSettings(batch_size=2, steps="uniform", num_steps=2), path=path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        C.load_stats(path)


def test_accumulator_size_does_not_grow_with_samples():
    abstract = jax.eval_shape(lambda: C.trajectory_stats(jnp.zeros((64, 256, 1152)), -1, "act", None, ("range",)))
    assert C.accumulator_bytes(abstract, 250) == 250 * (3 * 1152 + 3) * 4


def test_bad_settings_name_the_problem():
    with pytest.raises(ValueError, match="num_steps"):
        C.CalibrationSettings(steps="uniform")
    with pytest.raises(ValueError, match="cfg"):
        C.CalibrationSettings(cfg="half")
    with pytest.raises(ValueError, match="unknown statistics"):
        C.CalibrationSettings(stats=("range", "kurtosis"))
