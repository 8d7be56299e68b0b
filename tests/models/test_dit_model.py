"""The functional Model wrapper on DiT: pure apply, jit with a quantizer pytree, statistics
collection over the named sites, save/load, vmap over params, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdq.models
from jdq.models import dit
from jdq.quant import calibrate
from jdq.quant import transform as T

CFG = dit.Config(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=5)


@pytest.fixture(scope="module")
def model():
    return dit.from_config(CFG, key=3)


def batch(b=2, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((b, 8, 8, 4)), jnp.float32), jnp.asarray([10.0, 900.0][:b]),
            jnp.asarray([1, 5][:b]))


def test_apply_is_pure_and_call_uses_own_params(model):
    x, t, y = batch()
    out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8) and model.family == "dit"
    np.testing.assert_array_equal(jax.jit(model.apply)(model.params, x, t, y), out)
    other = jax.tree.map(lambda a: a * 1.5, model.params)
    assert not np.allclose(model.apply(other, x, t, y), out)


def test_operands_are_the_documented_sites(model):
    ops = T.trace_operands(model.apply, model.params, *batch())
    keys = [o.key for o in ops]
    per_block = [f"blocks.0.{s}" for s in ("adaLN_modulation:act", "attn.qkv:act", "attn.qk:q", "attn.qk:k",
                                           "attn.pv:attn_prob", "attn.pv:v", "attn.proj:act", "mlp.fc1:act",
                                           "mlp.fc2:post_gelu")]
    for k in per_block + ["x_embedder:weight", "t_embedder.mlp.0:act", "t_embedder.mlp.2:weight",
                          "final_layer.adaLN_modulation:act", "final_layer.linear:weight", "blocks.1.mlp.fc2:weight"]:
        assert k in keys
    assert len(keys) == 2 * 3 + CFG.depth * (2 * 5 + 4) + 2 * 2
    assert len(set(keys)) == len(keys)


def test_quantizer_changes_output_and_state_does_not_recompile(model):
    x, t, y = batch()
    ops = T.trace_operands(model.apply, model.params, x, t, y)

    def grid(x, state, ctx):  # a fake quantizer with a traced step size
        return jnp.round(x / state) * state

    plan = T.resolve([T.rule("blocks.*", T.QuantTransform(lambda s: jnp.float32(0.25), grid), roles=("weight", "act")),
                      T.keep_float("*")], ops)
    fp = model(x, t, y)
    coarse = model(x, t, y, quant=plan.bind(plan.init()))
    fine = model(x, t, y, quant=plan.bind({k: jnp.float32(1e-4) for k in plan.quantized_keys}))
    assert np.max(np.abs(coarse - fp)) > 1e-2
    assert np.max(np.abs(fine - fp)) < np.max(np.abs(coarse - fp)) / 10
    jitted = model._jitted[("__call__", ())]
    assert jitted._cache_size() == 2  # quant=None and one for the plan, whatever its state


@pytest.mark.slow
def test_collect_stats_sees_every_operand(model):
    x, t, y = batch()
    out, stats = calibrate.collect_stats(model.apply, model.params, x, t, y)
    np.testing.assert_allclose(out, model(x, t, y), rtol=1e-6, atol=1e-6)
    assert set(stats) == {o.key for o in T.trace_operands(model.apply, model.params, x, t, y)}
    assert stats["blocks.1.attn.pv:attn_prob"]["max"] <= 1.0
    # a non-pytree quantizer passed to the jitted __call__ runs inside the caller's trace
    out2, stats2 = calibrate.collect_stats(lambda *a, quant: model(*a, quant=quant), x, t, y)
    assert set(stats2) == set(stats)


def test_save_load_round_trip(tmp_path, model):
    x, t, y = batch()
    jdq.models.save(model, tmp_path / "m")
    loaded, cfg = jdq.models.load(tmp_path / "m")
    assert cfg == CFG
    np.testing.assert_array_equal(loaded(x, t, y), model(x, t, y))
    with pytest.raises(FileExistsError):
        jdq.models.save(model, tmp_path / "m")
    bf, _ = jdq.models.load(tmp_path / "m", dtype=jnp.bfloat16)
    assert bf.params["x_embedder"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.slow
def test_vmap_over_stacked_params(model):
    x, t, y = batch()
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), model.params)
    outs = jax.vmap(lambda p: model.apply(p, x, t, y))(stacked)
    np.testing.assert_allclose(outs[0], model(x, t, y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[1], model.apply(jax.tree.map(lambda a: 2 * a, model.params), x, t, y),
                               rtol=1e-5, atol=1e-5)


def test_bad_inputs_and_configs(model):
    with pytest.raises(ValueError, match=r"x must be \(B, 8, 8, 4\) channels-last, got \(2, 4, 8, 8\)"):
        model(jnp.zeros((2, 4, 8, 8)), jnp.zeros(2), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        dit.Config(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown DiT variant"):
        dit.Config.variant("XXL/2")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['depthh'\]"):
        dit.Config.from_dict({"depthh": 3})
    assert dit.Config.from_dict(CFG.to_dict()) == CFG
    assert dit.Config.variant("B/4", 512) == dit.Config(input_size=64, patch_size=4, hidden_size=768, depth=12,
                                                        num_heads=12)


def test_array_keyword_arguments_are_traced(model):
    x, t, y = batch()
    np.testing.assert_array_equal(model(x, t, y=y), model(x, t, y))
    np.testing.assert_array_equal(model(x, t, y=y + 1), model(x, t, y + 1))
    assert model._jitted[("__call__", ())]._cache_size() >= 1
    assert len([k for k in model._jitted if k[0] == "__call__"]) == 1  # one jitted function for both kwarg calls
