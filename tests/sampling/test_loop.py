"""The compiled sampling loop: determinism, per-sample randomness, guidance, per-step quantization, stats."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import quant as Q
from jdq.quant.timegroup import time_grouped
from jdq.sampling import (
    collect_sampler_stats,
    ddim,
    ddpm,
    dpm_solver_pp_2m,
    guided_output,
    initial_noise,
    sample,
    sample_keys,
    step_noise,
)
from tests.sampling import toy

PARAMS = toy.init()
LABELS = jnp.array([0, 1, 2, 1, 0, 2], jnp.int32)
NULL = jnp.full((1,), toy.NUM_CLASSES, jnp.int32)


def _run(sampler, keys=None, labels=LABELS, **kw):
    keys = sample_keys(0, labels.shape[0]) if keys is None else keys
    return np.asarray(sample(toy.apply, PARAMS, sampler, labels, keys, toy.SHAPE, **kw))


def _reference_loop(sampler, keys, labels, quantizer=None, uncond=None, guidance=1.0, guided_channels=None):
    """The same sampler as an unrolled Python loop, the quantizer stepped by hand."""
    x = initial_noise(keys, toy.SHAPE)
    carry = sampler.init_carry(x)
    for i in range(sampler.num_steps):
        t = jnp.full((x.shape[0],), sampler.timesteps[i], jnp.float32)
        q = None if quantizer is None else quantizer.at_step(i, sampler.num_steps)
        out = guided_output(toy.apply, PARAMS, x, t, labels, uncond, guidance, quant=q, guided_channels=guided_channels)
        noise = step_noise(keys, i, toy.SHAPE) if sampler.stochastic else None
        x, carry = sampler.update(i, x, out, carry, noise)
    return np.asarray(x)


@pytest.mark.parametrize("make", [lambda: ddpm(12), lambda: ddim(12, eta=0.5), lambda: dpm_solver_pp_2m(8)])
def test_scan_equals_unrolled_loop_and_is_deterministic(make):
    s = make()
    a, b = _run(s), _run(s)
    np.testing.assert_array_equal(a, b)  # same seed -> identical, run to run
    np.testing.assert_allclose(a, _reference_loop(s, sample_keys(0, 6), LABELS), rtol=1e-5, atol=1e-5)
    assert np.isfinite(a).all()
    assert not np.allclose(a, _run(s, keys=sample_keys(1, 6)))  # another seed, other samples


def _ddpm_trajectory_bound(sampler, keys, labels):
    """``(x, e)``: the exact (float64) toy DDPM run and a componentwise bound ``e`` on ``|x̂ − x|`` for
    any float32 evaluation of it.

    Running first-order error analysis (Higham §3) in float64 beside the exact trajectory: a k-term
    dot product adds γ_k·Σ|terms| (any summation order), an elementwise op one rounding, tanh and
    exp 8 ulps, and the errors already there propagate through the derivative of each step (|W|ᵀ for
    the linears, 1 − tanh² for tanh). The noise is the same bits in every evaluation (exact integer
    PRNG, elementwise transform); the float32 tables are the constants both sides use.
    """
    u = 2.0**-24
    gam = lambda k: k * u / (1 - k * u)  # noqa: E731
    P = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    c = {k: np.asarray(v, np.float64) for k, v in sampler.tables.items()}
    b = labels.shape[0]
    x = np.asarray(initial_noise(keys, toy.SHAPE), np.float64).reshape(b, -1)
    e = np.zeros_like(x)
    for i in range(sampler.num_steps):
        t = float(sampler.timesteps[i]) / 1000.0
        h1 = x @ P["w1"] + P["b1"]
        e_h1 = e @ np.abs(P["w1"]) + gam(17) * (np.abs(x) @ np.abs(P["w1"]) + np.abs(P["b1"]))
        a = h1 + P["temb"] * t + P["yemb"][labels]
        e_a = e_h1 + gam(3) * (np.abs(h1) + np.abs(P["temb"] * t) * 2 + np.abs(P["yemb"][labels]))
        h = np.tanh(a)
        e_h = (1 - h**2) * e_a + 8 * u * np.abs(h)
        out = h @ P["w2"]
        e_out = e_h @ np.abs(P["w2"]) + gam(32) * (np.abs(h) @ np.abs(P["w2"]))
        eps, e_eps = out[:, :16], e_out[:, :16]
        v = np.tanh(out[:, 16:])
        e_v = (1 - v**2) * e_out[:, 16:] + 8 * u * np.abs(v)
        k = {n: c[n][i] for n in c}
        x0 = k["sqrt_recip_ac"] * x - k["sqrt_recipm1_ac"] * eps
        e_x0 = k["sqrt_recip_ac"] * e + k["sqrt_recipm1_ac"] * e_eps + gam(3) * (
            np.abs(k["sqrt_recip_ac"] * x) + np.abs(k["sqrt_recipm1_ac"] * eps))
        mean = k["coef_x0"] * x0 + k["coef_xt"] * x
        e_mean = k["coef_x0"] * e_x0 + k["coef_xt"] * e + gam(3) * (np.abs(k["coef_x0"] * x0) + np.abs(k["coef_xt"] * x))
        frac = (v + 1) / 2
        log_var = frac * k["max_log"] + (1 - frac) * k["min_log"]
        e_frac = e_v / 2 + 2 * u * np.abs(frac)
        e_lv = e_frac * abs(k["max_log"] - k["min_log"]) + gam(4) * (
            np.abs(frac * k["max_log"]) + np.abs((1 - frac) * k["min_log"]) + abs(k["min_log"]))
        sd = np.exp(0.5 * log_var) * k["nonzero"]
        e_sd = sd * (0.5 * e_lv + 9 * u)
        noise = np.asarray(step_noise(keys, i, toy.SHAPE), np.float64).reshape(b, -1)
        x = mean + sd * noise
        e = e_mean + e_sd * np.abs(noise) + gam(2) * (np.abs(mean) + np.abs(sd * noise))
    return x.reshape((b,) + toy.SHAPE), e.reshape((b,) + toy.SHAPE)


def test_samples_do_not_depend_on_batch_composition():
    s = ddpm(10)
    full = _run(s, keys=sample_keys(7, 6))
    tail = _run(s, keys=sample_keys(7, 3, start=3), labels=LABELS[3:])
    # per-sample keys make the two runs the same arithmetic per sample, but a batch of 3 and one of
    # 6 may block the GEMMs' rows differently: equal up to two evaluations' rounding bounds
    exact, bound = _ddpm_trajectory_bound(s, sample_keys(7, 3, start=3), np.asarray(LABELS[3:]))
    assert np.all(np.abs(tail - exact) <= bound) and np.all(np.abs(full[3:] - exact) <= bound)
    assert np.all(np.abs(full[3:].astype(np.float64) - tail) <= 2 * bound)
    assert 2 * bound.max() < 1e-2 * np.abs(tail).max()  # far below a different sample's distance


def test_guidance_one_is_unguided_and_dit_style_channels():
    s = ddim(6)
    np.testing.assert_array_equal(_run(s), _run(s, uncond=NULL, guidance=1.0))
    guided = _run(s, uncond=NULL, guidance=3.0, guided_channels=1)
    assert not np.allclose(guided, _run(s))
    np.testing.assert_allclose(guided, _reference_loop(s, sample_keys(0, 6), LABELS, uncond=NULL, guidance=3.0,
                                                       guided_channels=1), rtol=1e-4, atol=1e-4)


def test_guided_output_formula():
    """``u + s (c - u)`` on the first ``guided_channels`` channels, the conditional output elsewhere."""
    x = jax.random.normal(jax.random.key(1), (3,) + toy.SHAPE)
    t = jnp.array([10.0, 500.0, 999.0])
    y = jnp.array([0, 1, 2])
    c = np.asarray(toy.apply(PARAMS, x, t, y))
    u = np.asarray(toy.apply(PARAMS, x, t, jnp.full((3,), 3)))
    g = np.asarray(guided_output(toy.apply, PARAMS, x, t, y, NULL, 4.0, guided_channels=1))
    np.testing.assert_allclose(g[..., :1], u[..., :1] + 4.0 * (c[..., :1] - u[..., :1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g[..., 1:], c[..., 1:], rtol=1e-6)
    g_all = np.asarray(guided_output(toy.apply, PARAMS, x, t, y, NULL, 4.0))
    np.testing.assert_allclose(g_all, u + 4.0 * (c - u), rtol=1e-5, atol=1e-5)
    g_sep = np.asarray(guided_output(toy.apply, PARAMS, x, t, y, NULL, 4.0, separate=True))
    np.testing.assert_allclose(g_sep, g_all, rtol=1e-5, atol=1e-6)


def _step_scaled_transform():
    """Multiplies its operand by ``state[step]``: the output depends on which step reached it."""
    return Q.QuantTransform(init=lambda stats: stats["scale"], apply=lambda x, s, ctx: x * s[ctx.step])


def _plan(transform):
    ops = Q.trace_operands(toy.apply, PARAMS, jnp.zeros((2,) + toy.SHAPE), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32))
    return Q.resolve([Q.rule("fc1", transform, roles=("act",)), Q.keep_float("*")], ops)


def test_step_index_reaches_the_transforms_inside_the_scan():
    s = ddim(8)
    plan = _plan(_step_scaled_transform())
    scales = jnp.linspace(0.5, 1.5, s.num_steps)
    quantizer = plan.bind(plan.init({"fc1:act": {"scale": scales}}))
    got = _run(s, quant=quantizer)
    np.testing.assert_allclose(got, _reference_loop(s, sample_keys(0, 6), LABELS, quantizer), rtol=1e-5, atol=1e-5)
    reversed_q = plan.bind(plan.init({"fc1:act": {"scale": scales[::-1]}}))
    assert not np.allclose(got, _run(s, quant=reversed_q), atol=1e-3)  # the step order matters
    ones = plan.bind(plan.init({"fc1:act": {"scale": jnp.ones(s.num_steps)}}))
    np.testing.assert_allclose(_run(s, quant=ones), _run(s), rtol=1e-6, atol=1e-6)


def test_time_grouped_state_is_selected_per_step():
    """jdq.quant.timegroup: two groups of 4 steps, each scaling fc1's input by its own factor."""
    s = ddim(8)
    inner = Q.QuantTransform(init=lambda st: jnp.max(st["scale"]), apply=lambda x, v, ctx: x * v)
    plan = _plan(time_grouped(inner, num_groups=2, group_len=4))
    stats = {"fc1:act": {"scale": jnp.array([0.5] * 4 + [2.0] * 4)}}
    quantizer = plan.bind(plan.init(stats))
    by_step = plan.bind({"fc1:act": jnp.array([0.5] * 4 + [2.0] * 4)})
    direct = _plan(_step_scaled_transform())
    expect = _run(s, quant=direct.bind({"fc1:act": jnp.array([0.5] * 4 + [2.0] * 4)}))
    np.testing.assert_allclose(_run(s, quant=quantizer), expect, rtol=1e-6, atol=1e-6)
    del by_step


def test_vmap_over_stacked_quantizer_state_is_a_sweep_in_one_call():
    s = ddim(5)
    plan = _plan(_step_scaled_transform())
    states = [plan.init({"fc1:act": {"scale": jnp.full((5,), v)}}) for v in (0.7, 1.3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    keys = sample_keys(0, 6)
    swept = jax.vmap(lambda st: sample(toy.apply, PARAMS, s, LABELS, keys, toy.SHAPE, quant=plan.bind(st)))(stacked)
    for k, st in enumerate(states):
        np.testing.assert_allclose(np.asarray(swept[k]), _run(s, quant=plan.bind(st)), rtol=1e-5, atol=1e-5)


def test_collect_sampler_stats_has_a_step_axis_matching_each_step():
    s = ddim(5)
    keys = sample_keys(3, 6)
    samples, stats = collect_sampler_stats(toy.apply, PARAMS, s, LABELS, keys, toy.SHAPE, uncond=NULL, guidance=2.0)
    np.testing.assert_allclose(np.asarray(samples), _run(s, keys=keys, uncond=NULL, guidance=2.0), rtol=1e-5, atol=1e-6)
    assert set(stats) == {"fc1:act", "fc1:weight", "fc2:post_gelu", "fc2:weight"}
    assert stats["fc1:act"]["absmax"].shape == (5,)
    assert stats["fc1:act"]["absmax_channel"].shape == (5, 16)
    # step 2's statistics are those of the model input at step 2 (joint cond/uncond batch)
    x = initial_noise(keys, toy.SHAPE)
    for i in range(3):
        t = jnp.full((6,), s.timesteps[i], jnp.float32)
        if i == 2:
            xx = jnp.concatenate([x, x]).reshape(12, -1)
            np.testing.assert_allclose(stats["fc1:act"]["absmax"][2], jnp.abs(xx).max(), rtol=1e-6)
            np.testing.assert_allclose(stats["fc1:act"]["max_channel"][2], xx.max(axis=0), rtol=1e-6)
        out = guided_output(toy.apply, PARAMS, x, t, LABELS, NULL, 2.0)
        x, _ = s.update(i, x, out, None)
    # the weight statistics do not change over steps
    np.testing.assert_array_equal(stats["fc1:weight"]["absmax"], np.full(5, np.abs(PARAMS["w1"]).max()))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="leading batch axis of 6"):
        sample(toy.apply, PARAMS, ddim(3), LABELS[:4], sample_keys(0, 6), toy.SHAPE)
    with pytest.raises(TypeError, match="jdq.sampling.Sampler"):
        sample(toy.apply, PARAMS, "ddim", LABELS, sample_keys(0, 6), toy.SHAPE)
    with pytest.raises(ValueError, match="expected 1 or 2"):
        ddim(3).update(0, jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4, 4, 3)), None)
