"""Named recipes: every one resolves on a DiT, quantizes what it says, and errors name the problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import quant as Q
from jdq import recipes
from jdq.models import dit

CFG = dit.Config(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=5)
MODEL = dit.from_config(CFG, key=0)
X = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
T = jnp.array([10.0, 600.0])
Y = jnp.array([1, 5])
OPERANDS = Q.trace_operands(MODEL.apply, MODEL.params, X, T, Y)
FP = MODEL.apply(MODEL.params, X, T, Y)


def _rel_err(name):
    plan = recipes.plan_for(name, OPERANDS)
    out = MODEL.apply(MODEL.params, X, T, Y, quant=plan.bind(plan.init(), step=0))
    return float(jnp.linalg.norm(out - FP) / jnp.linalg.norm(FP))


def test_required_recipes_exist():
    names = set(recipes.names())
    assert {"w8a8", "mixdit"} <= names
    assert set(recipes.MX_FORMATS) <= names
    assert {"mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8", "mx9", "mx6", "mx4"} <= names


@pytest.mark.parametrize("name", [n for n in recipes.names() if not recipes.get(n).calibrated])
def test_uncalibrated_recipes_quantize_only_the_blocks(name):
    plan = recipes.plan_for(name, OPERANDS)
    keys = plan.quantized_keys
    assert keys and all(k.startswith("blocks.") for k in keys)
    assert not plan.uncovered()
    roles = {k.split(":")[1] for k in keys}
    if name == "w8a8-fp8attn":  # w8a8 plus both attention matmuls in E4M3
        assert roles == {"weight", "act", "post_gelu", "q", "k", "v", "attn_prob"}
    elif name.startswith(("w8", "w6", "w4")):
        assert roles == {"weight", "act", "post_gelu"}  # attention matmuls stay in floating point
    else:
        assert {"q", "k", "v", "attn_prob"} <= roles  # MX plans: every matmul operand in the blocks
    assert 0 < _rel_err(name) < 0.5


@pytest.mark.slow
def test_error_grows_as_the_format_shrinks():
    assert _rel_err("mx9") < _rel_err("mx6") < _rel_err("mx4")
    assert _rel_err("mxfp8_e4m3") < _rel_err("mxfp4_e2m1")
    assert _rel_err("w8a8") < _rel_err("w4a8")


def test_mixdit_uses_mx9_outliers_over_mx6():
    plan = recipes.plan_for("mixdit", OPERANDS)
    act = plan.transform_for("blocks.0.mlp.fc1:act").meta
    attn = plan.transform_for("blocks.1.attn.qk:q").meta
    assert isinstance(act, Q.OutlierMeta) and act.hi.name == "mx9" and act.lo.name == "mx6"
    state = plan.init()
    assert float(state["blocks.0.mlp.fc1:act"]["ratio"]) == pytest.approx(0.05)
    assert float(state["blocks.1.attn.qk:q"]["ratio"]) == pytest.approx(0.20)
    assert plan.transform_for("blocks.0.mlp.fc1:weight").meta.fmt == "mx6"
    assert isinstance(attn, Q.OutlierMeta)
    # all outliers: every activation in MX9; none: every activation in MX6 (weights stay MX6)
    def out(ratio):
        st = Q.set_outlier_ratio(plan, state, ratio)
        return MODEL.apply(MODEL.params, X, T, Y, quant=plan.bind(st))
    mx6 = recipes.plan_for("mx6", OPERANDS)
    np.testing.assert_allclose(out(0.0), MODEL.apply(MODEL.params, X, T, Y, quant=mx6.bind(mx6.init())), rtol=1e-5, atol=1e-6)
    w6a9 = Q.resolve([Q.rule(recipes.BLOCKS, Q.cast("mx6"), roles=("weight",)), Q.rule(recipes.BLOCKS, Q.cast("mx9")),
                      Q.keep_float("*")], OPERANDS)
    np.testing.assert_allclose(out(1.0), MODEL.apply(MODEL.params, X, T, Y, quant=w6a9.bind(w6a9.init())), rtol=1e-5, atol=1e-6)


def test_static_recipe_needs_statistics():
    plan = recipes.plan_for("w8a8-static", OPERANDS)
    with pytest.raises(KeyError, match="run calibration"):
        plan.init({})
    _, stats = Q.collect_stats(MODEL.apply, MODEL.params, X, T, Y)
    stats = Q.stack_stats([stats])
    out = MODEL.apply(MODEL.params, X, T, Y, quant=plan.bind(plan.init(stats)))
    assert float(jnp.linalg.norm(out - FP) / jnp.linalg.norm(FP)) < 0.05


def test_unknown_and_unfitting_recipes():
    with pytest.raises(recipes.RecipeError, match="unknown quantization recipe 'int3'.*w8a8"):
        recipes.get("int3")
    no_blocks = dit.from_config(CFG.replace(depth=0), key=0)
    ops = Q.trace_operands(no_blocks.apply, no_blocks.params, X, T, Y)
    with pytest.raises(recipes.RecipeError, match="does not fit this model"):
        recipes.plan_for("mx6", ops)
    with pytest.raises(ValueError, match="already registered"):
        recipes.register(recipes.get("mx6"))
