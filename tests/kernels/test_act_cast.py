"""The one-pass activation + MX cast: the Mosaic GPU kernel in interpret mode equals the reference bit for bit (every
MX / MX9-MX6-MX4 format, with and without the GELU, special values included), its operation-by-operation GELU is
the model's bf16 GELU on every bf16 value, the reference is the unfused MLP's GELU and cast, the real kernel
lowers to Mosaic GPU at DiT-XL/2's fc2 shape, and an MLP routes to it only for the casts it implements."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kernel_testutil import lowers_to_mosaic_gpu

from jdq import formats, recipes
from jdq.kernels.act_cast import act_cast, reference, supports_cast
from jdq.kernels.act_cast.gpu import Config, act_cast_gpu
from jdq.kernels.act_cast.ref import gelu_tanh_rounded
from jdq.models import layers
from jdq.quant import trace_operands

FORMATS = ["mx9", "mx6", "mx4", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4_e2m1", "mxint8"]


def _input(key=0, m=32, k=256):
    """bf16 (m, k) of mixed magnitudes with zeros, a NaN, infinities and tiny values in some blocks."""
    k1, k2 = jax.random.split(jax.random.key(key))
    x = jax.random.normal(k1, (m, k)) * 2.0 ** jax.random.randint(k2, (m, k // 32, 1), -20, 12).repeat(32, -1).reshape(m, k)
    x = x.at[0, :32].set(0.0).at[1, 5].set(jnp.nan).at[2, 40].set(jnp.inf).at[3, 70].set(-jnp.inf)
    x = x.at[4, 96:128].set(1e-39)  # float32 subnormals: bf16 keeps some
    return x.astype(jnp.bfloat16)


def _bits(a):
    return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint16))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_interpreted_kernel_equals_the_reference_bit_for_bit(fmt, activation):
    x = _input()
    spec = formats.get(fmt)
    got = act_cast_gpu(x, spec, activation, config=Config(rows=64), interpret=True)
    # both compiled: XLA's CPU tanh differs between op-by-op and fused code by an ulp, which can move a
    # bf16 rounding of the GELU
    want = jax.jit(reference, static_argnums=(1, 2))(x, spec, activation)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_rounded_gelu_is_the_models_bf16_gelu_on_every_bf16_value():
    """The kernel's operation-by-operation GELU equals jax.nn.gelu of bf16 inputs, every bf16 value (NaN: NaN)."""
    x = jax.lax.bitcast_convert_type(jnp.arange(2**16, dtype=jnp.uint32).astype(jnp.uint16), jnp.bfloat16)
    want = _bits(jax.jit(lambda v: jax.nn.gelu(v, approximate=True))(x))
    got = _bits(jax.jit(lambda v: gelu_tanh_rounded(v.astype(jnp.float32)))(x).astype(jnp.bfloat16))
    nan = np.isnan(np.asarray(x, np.float32))
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.all(np.isnan(np.asarray(jax.lax.bitcast_convert_type(got[nan], jnp.bfloat16), np.float32)))


def test_reference_is_the_unfused_mlp_activation_and_cast():
    x = _input(1)
    spec = formats.get("mx6")
    np.testing.assert_array_equal(_bits(reference(x, spec)), _bits(formats.cast(x, spec, axis=-1)))
    unfused = formats.cast(jax.nn.gelu(x, approximate=True), spec, axis=-1)
    np.testing.assert_array_equal(_bits(reference(x, spec, "gelu_tanh")), _bits(unfused))


def test_dispatch_runs_the_kernel_where_it_tiles_and_the_reference_elsewhere():
    spec = formats.get("mxfp8_e4m3")
    x = _input(2, m=16, k=512).reshape(2, 8, 512)
    got = act_cast(x, spec, "gelu_tanh", impl="gpu_interpret", config=Config(rows=64))
    np.testing.assert_array_equal(_bits(got), _bits(reference(x, spec, "gelu_tanh")))
    odd = _input(3, m=3, k=64)  # 6 kernel rows: no 64-row tiling, so the XLA reference runs
    np.testing.assert_array_equal(_bits(act_cast(odd, spec, None, impl="gpu_interpret")), _bits(reference(odd, spec)))


@pytest.mark.parametrize("fmt,activation", [("mx6", "gelu_tanh"), ("mxfp8_e4m3", "gelu_tanh"), ("mxint8", None)])
def test_kernel_lowers_to_mosaic_gpu_at_the_dit_fc2_shape(fmt, activation):
    fn = functools.partial(act_cast_gpu, spec=formats.get(fmt), activation=activation)
    assert lowers_to_mosaic_gpu(fn, ((64 * 256, 4608), jnp.bfloat16))


def test_bad_inputs_are_named():
    spec = formats.get("mx6")
    x = _input()
    with pytest.raises(TypeError, match="bfloat16"):
        act_cast(x.astype(jnp.float32), spec)
    with pytest.raises(ValueError, match="multiple of 32"):
        act_cast(x[:, :48], spec)
    with pytest.raises(ValueError, match="activation 'relu'"):
        act_cast(x, spec, "relu")
    with pytest.raises(ValueError, match="not an MX"):
        act_cast(x, formats.get("int8"))
    with pytest.raises(ValueError, match="rows=100"):
        act_cast_gpu(x, spec, config=Config(rows=100), interpret=True)
    assert supports_cast(formats.get("mxfp8_e4m3")) is None and "not an MX" in supports_cast(formats.get("fp8_e4m3"))


MLP_SITE = "blocks.0.mlp"


def _mlp_and_input():
    mlp = layers.Mlp(64, 256, site=MLP_SITE, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 32, 64)).astype(jnp.bfloat16)
    return mlp, x


@pytest.mark.parametrize("recipe", ["mx6", "mxfp8_e4m3", "mxint8"])
def test_mlp_routes_a_block_cast_of_fc2s_input_through_the_one_pass(recipe, monkeypatch):
    """With the route on, the MLP is fc2(act_cast(fc1(x))) with fc2's input cast not applied again; with
    ``xla``, fc2(cast(gelu(fc1(x))))."""
    mlp, x = _mlp_and_input()
    plan = recipes.plan_for(recipe, trace_operands(lambda x, quant: mlp(x, quant), x))
    q = plan.bind(plan.init())
    spec = q.transform_for(f"{MLP_SITE}.fc2", "post_gelu").meta.spec
    h = mlp.fc1(x, q)
    monkeypatch.setenv(layers.ACT_CAST_ENV, "kernel")
    np.testing.assert_array_equal(_bits(mlp(x, q)), _bits(mlp.fc2(reference(h, spec, "gelu_tanh"), q, cast_input=False)))
    monkeypatch.setenv(layers.ACT_CAST_ENV, "xla")
    np.testing.assert_array_equal(_bits(mlp(x, q)), _bits(mlp.fc2(mlp.fc1(x, q, activation="gelu_tanh"), q)))


@pytest.mark.parametrize("recipe", ["w8a8", "mixdit", "fp16"])
def test_mlp_keeps_the_unfused_path_for_other_casts(recipe, monkeypatch):
    """Per-token int8 (w8a8), the MX9 / MX6 outlier split (mixdit), and no cast (fp16) keep GELU and cast apart."""
    mlp, x = _mlp_and_input()
    plan = recipes.plan_for(recipe, trace_operands(lambda x, quant: mlp(x, quant), x))
    monkeypatch.setenv(layers.ACT_CAST_ENV, "kernel")
    monkeypatch.setattr("jdq.kernels.act_cast.act_cast", lambda *a, **kw: pytest.fail("one pass taken"))
    mlp(x, plan.bind(plan.init()))


def test_bad_route_choice_is_named(monkeypatch):
    mlp, x = _mlp_and_input()
    plan = recipes.plan_for("mx6", trace_operands(lambda x, quant: mlp(x, quant), x))
    monkeypatch.setenv(layers.ACT_CAST_ENV, "fast")
    with pytest.raises(ValueError, match="JDQ_ACT_CAST='fast'"):
        mlp(x, plan.bind(plan.init()))


def test_the_op_vmaps():
    """A vmapped call (a precision sweep batches the activations) equals the reference per element."""
    spec = formats.get("mx6")
    x = _input(4, m=64, k=128).reshape(2, 32, 128)
    got = jax.vmap(lambda v: act_cast(v, spec, "gelu_tanh", impl="gpu_interpret", config=Config(rows=64)))(x)
    want = jax.jit(jax.vmap(lambda v: reference(v, spec, "gelu_tanh")))(x)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_the_op_is_differentiable_as_the_reference():
    """The gradient through the kernel (interpret mode) is the reference's: the GELU's derivative, the cast straight-through."""
    spec = formats.get("mxfp8_e4m3")
    x = jax.random.normal(jax.random.key(5), (64, 128)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(6), (64, 128))

    def grad(fn):
        return jax.grad(lambda v: jnp.sum(fn(v).astype(jnp.float32) * w))(x)

    got = grad(lambda v: act_cast(v, spec, "gelu_tanh", impl="gpu_interpret", config=Config(rows=64)))
    want = grad(lambda v: reference(v, spec, "gelu_tanh"))
    np.testing.assert_array_equal(_bits(got), _bits(want))
    assert np.abs(np.asarray(got, np.float32)).max() > 0
