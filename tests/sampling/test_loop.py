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
    # the scan and the unrolled loop: two float32 evaluations of one run (the order of the dots may differ)
    assert_same_run(a, _reference_loop(s, sample_keys(0, 6), LABELS),
                    _trajectory_bound(s, sample_keys(0, 6), LABELS)[1])
    assert np.isfinite(a).all()
    assert not np.allclose(a, _run(s, keys=sample_keys(1, 6)))  # another seed, other samples


U = 2.0**-24


def _gam(k):
    return k * U / (1 - k * U)


def _lin(*terms):
    """``Σ c·v`` and its error bound, for terms ``(c, v, e)`` (``c`` exact, ``v`` within ``e``): any order."""
    val = sum(c * v for c, v, _ in terms)
    err = sum(np.abs(c) * e for c, _, e in terms) + _gam(len(terms)) * sum(np.abs(c * v) for c, v, _ in terms)
    return val, err


def _toy_with_error(x, e, t, labels, act_scale=1.0):
    """The toy denoiser in float64 on flat ``x`` (B, 16) within ``e``: ``(eps, e_eps, v, e_v)``."""
    P = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    if act_scale != 1.0:  # a transform multiplying fc1's input: one more rounding
        x, e = x * act_scale, np.abs(act_scale) * e + U * np.abs(x * act_scale)
    h1 = x @ P["w1"] + P["b1"]
    e_h1 = e @ np.abs(P["w1"]) + _gam(17) * (np.abs(x) @ np.abs(P["w1"]) + np.abs(P["b1"]))
    temb = P["temb"] * (t / 1000.0)
    a = h1 + temb + P["yemb"][labels]
    e_a = e_h1 + _gam(3) * (np.abs(h1) + 2 * np.abs(temb) + np.abs(P["yemb"][labels]))
    h = np.tanh(a)
    e_h = (1 - h**2) * e_a + 8 * U * np.abs(h)  # tanh: |tanh'| = 1 − tanh², 8 ulps of its own
    out = h @ P["w2"]
    e_out = e_h @ np.abs(P["w2"]) + _gam(32) * (np.abs(h) @ np.abs(P["w2"]))
    v = np.tanh(out[:, 16:])
    return out[:, :16], e_out[:, :16], v, (1 - v**2) * e_out[:, 16:] + 8 * U * np.abs(v)


def _guided(u, e_u, c, e_c, g):
    """``u + g·(c − u)`` as computed (three roundings) and its error bound."""
    val = u + g * (c - u)
    err = np.abs(1 - g) * e_u + np.abs(g) * e_c + _gam(3) * (np.abs(u) + np.abs(g) * (np.abs(c) + np.abs(u)))
    return val, err


def _trajectory_bound(sampler, keys, labels, null=None, guidance=1.0, guided_channels=None, act_scales=None):
    """``(x, e)``: the exact (float64) toy run of ``sampler`` and a componentwise bound ``e`` on ``|x̂ − x|``
    for any float32 evaluation of it.

    Running first-order error analysis (Higham §3) beside the exact trajectory: a k-term dot product or
    linear combination adds γ_k·Σ|terms| (any summation order), a division one rounding, tanh and exp 8
    ulps; the errors already present propagate through each step's derivative (|W|ᵀ for the linears,
    1 − tanh² for tanh, the sampler's coefficients). The noise is the same bits in every evaluation
    (exact integer PRNG, elementwise transform); the float32 tables are constants both sides use.
    """
    c = {k: np.asarray(v, np.float64) for k, v in sampler.tables.items()}
    b = labels.shape[0]
    x = np.asarray(initial_noise(keys, toy.SHAPE), np.float64).reshape(b, -1)
    e = np.zeros_like(x)
    carry, e_carry = np.zeros_like(x), np.zeros_like(x)
    for i in range(sampler.num_steps):
        t = float(sampler.timesteps[i])
        s_act = 1.0 if act_scales is None else float(act_scales[i])
        eps, e_eps, v, e_v = _toy_with_error(x, e, t, labels, s_act)
        if null is not None and guidance != 1.0:
            u_eps, e_ueps, u_v, e_uv = _toy_with_error(x, e, t, np.broadcast_to(null, labels.shape), s_act)
            eps, e_eps = _guided(u_eps, e_ueps, eps, e_eps, guidance)
            if guided_channels is None:
                v, e_v = _guided(u_v, e_uv, v, e_v, guidance)
        k = {n: c[n][i] for n in c}
        noise = np.asarray(step_noise(keys, i, toy.SHAPE), np.float64).reshape(b, -1) if sampler.stochastic else None
        if sampler.kind in ("ddpm", "ddim"):
            x0, e_x0 = _lin((k["sqrt_recip_ac"], x, e), (-k["sqrt_recipm1_ac"], eps, e_eps))
        if sampler.kind == "ddpm":
            mean, e_mean = _lin((k["coef_x0"], x0, e_x0), (k["coef_xt"], x, e))
            frac, e_frac = (v + 1) / 2, e_v / 2 + 2 * U * np.abs((v + 1) / 2)
            log_var = frac * k["max_log"] + (1 - frac) * k["min_log"]
            e_lv = e_frac * abs(k["max_log"] - k["min_log"]) + _gam(4) * (
                np.abs(frac * k["max_log"]) + np.abs((1 - frac) * k["min_log"]) + abs(k["min_log"]))
            sd = np.exp(0.5 * log_var) * k["nonzero"]
            x, e = _lin((1.0, mean, e_mean), (noise, sd, sd * (0.5 * e_lv + 9 * U)))
        elif sampler.kind == "ddim":
            terms = [(k["coef_x0"], x0, e_x0), (k["coef_eps"], eps, e_eps)]
            if sampler.stochastic:
                terms.append((k["sigma"], noise, 0.0))
            x, e = _lin(*terms)
        elif sampler.kind == "dpm++2m":
            num, e_num = _lin((1.0, x, e), (-k["sigma_s"], eps, e_eps))
            x0, e_x0 = num / k["alpha_s"], e_num / k["alpha_s"] + U * np.abs(num / k["alpha_s"])
            d, e_d = x0 - carry, e_x0 + e_carry + U * np.abs(x0 - carry)
            x, e = _lin((k["coef_x"], x, e), (k["coef_d0"], x0, e_x0), (k["coef_d1"], d, e_d))
            carry, e_carry = x0, e_x0
        else:
            raise ValueError(sampler.kind)
    return x.reshape((b,) + toy.SHAPE), e.reshape((b,) + toy.SHAPE)


def assert_same_run(got, want, bound, *more):
    """``got`` and ``want`` are float32 evaluations of the run whose bound is ``bound``: within ``2·bound``.

    The bound must also stay below a tenth of the samples' scale (a different run differs by about
    that scale), or the check would be vacuous.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.abs(got - want) <= 2 * bound), f"max excess {np.max(np.abs(got - want) - 2 * bound):.3g}"
    assert 2 * bound.max() < 0.1 * np.abs(want).max()


def test_samples_do_not_depend_on_batch_composition():
    s = ddpm(10)
    full = _run(s, keys=sample_keys(7, 6))
    tail = _run(s, keys=sample_keys(7, 3, start=3), labels=LABELS[3:])
    # per-sample keys make the two runs the same arithmetic per sample, but a batch of 3 and one of
    # 6 may block the GEMMs' rows differently: equal up to two evaluations' rounding bounds
    exact, bound = _trajectory_bound(s, sample_keys(7, 3, start=3), np.asarray(LABELS[3:]))
    assert np.all(np.abs(tail - exact) <= bound) and np.all(np.abs(full[3:] - exact) <= bound)
    assert_same_run(full[3:], tail, bound)


def test_guidance_one_is_unguided_and_dit_style_channels():
    s = ddim(6)
    np.testing.assert_array_equal(_run(s), _run(s, uncond=NULL, guidance=1.0))
    guided = _run(s, uncond=NULL, guidance=3.0, guided_channels=1)
    assert not np.allclose(guided, _run(s))
    assert_same_run(guided, _reference_loop(s, sample_keys(0, 6), LABELS, uncond=NULL, guidance=3.0, guided_channels=1),
                    _trajectory_bound(s, sample_keys(0, 6), LABELS, NULL, 3.0, guided_channels=1)[1])


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
    assert_same_run(got, _reference_loop(s, sample_keys(0, 6), LABELS, quantizer),
                    _trajectory_bound(s, sample_keys(0, 6), LABELS, act_scales=np.asarray(scales))[1])
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
    for k, (st, v) in enumerate(zip(states, (0.7, 1.3))):  # vmapped and single runs: the dots may be batched
        assert_same_run(swept[k], _run(s, quant=plan.bind(st)),
                        _trajectory_bound(s, keys, LABELS, act_scales=np.full(5, v, np.float32))[1])


def test_collect_sampler_stats_has_a_step_axis_matching_each_step():
    s = ddim(5)
    keys = sample_keys(3, 6)
    samples, stats = collect_sampler_stats(toy.apply, PARAMS, s, LABELS, keys, toy.SHAPE, uncond=NULL, guidance=2.0)
    assert_same_run(samples, _run(s, keys=keys, uncond=NULL, guidance=2.0),
                    _trajectory_bound(s, keys, LABELS, NULL, 2.0)[1])
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
