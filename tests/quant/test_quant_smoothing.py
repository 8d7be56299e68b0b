"""center_tokens (SageAttention's smoothing of K): attention is unchanged in exact arithmetic, and an FP8
cast of the centred keys loses less than of the raw keys when the keys share a large offset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq.models.layers import attention
from jdq.quant import Context, cast, center_tokens, chain, keep_float, resolve, rule, trace_operands
from jdq.quant.smoothing import token_axis


def _qkv(key, b=2, l=32, h=2, d=16, offset=6.0):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    q = jax.random.normal(k1, (b, l, h, d))
    k = jax.random.normal(k2, (b, l, h, d)) + offset * jax.random.normal(k4, (1, 1, h, d))  # a shared key offset
    v = jax.random.normal(k3, (b, l, h, d))
    return q, k, v


def _plan(site_rules, q, k, v):
    fn = lambda q, k, v, quant: attention(q, k, v, site="blocks.0.attn", quant=quant)  # noqa: E731
    ops = trace_operands(fn, q, k, v)
    return fn, resolve(site_rules + [keep_float("*")], ops)


def test_token_axis_is_the_other_matrix_axis():
    assert token_axis(4, -2) == 3 and token_axis(4, -1) == 2 and token_axis(3, 2) == 1
    with pytest.raises(ValueError, match="last two axes"):
        token_axis(4, 0)


def test_centring_k_leaves_attention_unchanged():
    # softmax is invariant to a constant per row of logits: the same output up to float32 rounding
    # of logits of size ~|q||k| ~ 30 (1e-4 relative is ~100 ulps of headroom)
    q, k, v = _qkv(jax.random.key(0))
    fn, plan = _plan([rule("*.qk", center_tokens(), roles=("k",))], q, k, v)
    got = fn(q, k, v, quant=plan.bind(plan.init()))
    want = fn(q, k, v, quant=None)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-4
    centred = center_tokens().apply(jnp.transpose(k, (0, 2, 3, 1)), (), Context("blocks.0.attn.qk", "k", -2))
    np.testing.assert_allclose(np.asarray(centred.mean(-1)), 0.0, atol=1e-5)


def test_fp8_attention_with_centred_k_is_more_accurate():
    q, k, v = _qkv(jax.random.key(1))
    e4m3 = cast("fp8_e4m3", granularity="row")
    want = attention(q, k, v, site="a", quant=None)
    errs = {}
    for name, k_rule in (("raw", e4m3), ("centred", chain(center_tokens(), e4m3))):
        rules = [rule("*.qk", e4m3, roles=("q",)), rule("*.qk", k_rule, roles=("k",)),
                 rule("*.pv", e4m3, roles=("attn_prob", "v"))]
        fn, plan = _plan(rules, q, k, v)
        got = fn(q, k, v, quant=plan.bind(plan.init()))
        errs[name] = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert errs["centred"] < 0.5 * errs["raw"], errs


def test_fp8_attention_recipe_quantizes_the_attention_operands():
    from jdq import recipes

    q, k, v = _qkv(jax.random.key(2))
    fn = lambda q, k, v, quant: attention(q, k, v, site="blocks.0.attn", quant=quant)  # noqa: E731
    plan = recipes.plan_for("w8a8-fp8attn", trace_operands(fn, q, k, v))
    assert set(plan.quantized_keys) == {"blocks.0.attn.qk:q", "blocks.0.attn.qk:k", "blocks.0.attn.pv:attn_prob",
                                        "blocks.0.attn.pv:v"}
