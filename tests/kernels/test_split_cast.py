"""split_cast: MixDiT's split of a linear input in one kernel. In interpret mode it equals the reference bit for bit
(every edge ratio, ties, special values, the GELU first); it runs under vmap and differentiates as the reference;
the real kernel lowers at DiT-XL/2's and SD3's shapes; qlinear and the MLP route to it as the environment says."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kernel_testutil import lowers_to_mosaic_gpu

from jdq import quant as Q
from jdq import recipes
from jdq.kernels.split_cast import reference, split_cast, unsupported
from jdq.kernels.split_cast.gpu import chunk_words, key_cols, split_cast_gpu, supports
from jdq.models import layers
from jdq.quant import trace_operands
from jdq.quant.outliers import outlier_count

META = Q.outlier_split(0.05, hi="mx9", lo="mx6").meta


def _input(key=0, m=64, k=1152):
    """bf16 (m, k): magnitudes spread over blocks, tied block maxima, zeros, NaN, infinities, subnormals."""
    k1, k2 = jax.random.split(jax.random.key(key))
    x = jax.random.normal(k1, (m, k)) * 2.0 ** jax.random.randint(k2, (m, k // 16, 1), -12, 8).repeat(16, -1).reshape(m, k)
    x = x.at[0, :].set(1.5).at[1, ::16].set(3.0)  # a row of equal blocks; equal maxima at every block's start
    x = x.at[2, 17].set(jnp.nan).at[3, 40].set(jnp.inf).at[4, 70].set(-jnp.inf).at[5, :].set(0.0)
    x = x.at[6, 96:128].set(1e-39)
    return x.astype(jnp.bfloat16)


def _bits(a):
    return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint16))


def _want(x, ratio, activation):
    # compiled, as the model runs it (XLA's CPU tanh differs by an ulp between op-by-op and fused code)
    return jax.jit(reference, static_argnums=(2, 3))(x, jnp.float32(ratio), META, activation)


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
@pytest.mark.parametrize("k", [1152, 4608])
def test_interpreted_kernel_equals_the_reference_bit_for_bit_at_every_edge_ratio(k, activation):
    x = _input(k=k)
    n = k // 16
    for ratio in (0.0, 0.5 / n, 0.05, 0.2, 1.0):  # no block, one, the recipe's, a fifth, every block
        got = split_cast_gpu(x, outlier_count(ratio, n), META, activation, interpret=True)
        np.testing.assert_array_equal(_bits(got), _bits(_want(x, ratio, activation)), err_msg=f"ratio {ratio}")


def test_kernel_takes_a_k_per_row_and_more_than_the_row_has():
    x = _input(1, m=64, k=384)
    ks = jnp.arange(64, dtype=jnp.int32) % 27 - 1  # -1 and 0: no block; 25, 26 > 24 blocks: all
    got = split_cast_gpu(x, ks, META, interpret=True)
    for r in (0, 1, 2, 3, 13, 25, 26):
        want = _want(x[r:r + 1], jnp.clip(ks[r], 0, 24) / 24, None)
        np.testing.assert_array_equal(_bits(got[r:r + 1]), _bits(want), err_msg=f"row {r}, k {int(ks[r])}")


def test_the_op_vmaps_over_ratios_and_differentiates_as_the_reference():
    """A precision sweep vmaps the ratio (plan state): one program, each point the reference's."""
    x = _input(2, m=64, k=384).reshape(2, 32, 384)
    ratios = jnp.asarray([0.0, 0.05, 0.5], jnp.float32)
    got = jax.vmap(lambda r: split_cast(x, r, META, "gelu_tanh", impl="gpu_interpret"))(ratios)
    for i, r in enumerate(ratios):
        np.testing.assert_array_equal(_bits(got[i]), _bits(_want(x, r, "gelu_tanh")))
    w = jax.random.normal(jax.random.key(6), x.shape)

    def grad(fn):
        clean = jax.random.normal(jax.random.key(7), x.shape).astype(jnp.bfloat16)
        return jax.grad(lambda v: jnp.sum(fn(v).astype(jnp.float32) * w))(clean)

    g = grad(lambda v: split_cast(v, 0.05, META, "gelu_tanh", impl="gpu_interpret"))
    np.testing.assert_array_equal(_bits(g), _bits(grad(lambda v: reference(v, 0.05, META, "gelu_tanh"))))
    assert np.abs(np.asarray(g, np.float32)).max() > 0


@pytest.mark.parametrize("k,activation", [(1152, None), (4608, "gelu_tanh"), (1536, None)])
def test_kernel_lowers_to_mosaic_gpu(k, activation):
    """DiT-XL/2 / PixArt-Σ (1152, 4608) and SD3 (1536) linear inputs at batch 32 + CFG (SD3's 6144-wide fc2
    input needs more shared memory for its keys: the row_select route takes it)."""
    fn = functools.partial(split_cast_gpu, meta=META, activation=activation)
    assert lowers_to_mosaic_gpu(fn, ((64 * 256, k), jnp.bfloat16), ((), jnp.int32))


def test_chunks_hold_whole_blocks_with_an_odd_number_of_sectors_per_row():
    assert "exceed" in supports(64, 6144, 16)
    for k in (128, 384, 1152, 1536, 4608):
        cw = chunk_words(k // 2)
        assert (k // 2) % cw == 0 and cw % 8 == 0 and (cw // 8) % 2 == 1
        assert key_cols(cw) >= cw // 8 and supports(64, k, 16) is None


def test_bad_inputs_are_named_and_other_shapes_fall_back_to_the_reference():
    x = _input(3, m=64, k=384)
    with pytest.raises(TypeError, match="bfloat16"):
        split_cast(x.astype(jnp.float32), 0.05, META)
    with pytest.raises(ValueError, match="multiple of the block 16"):
        split_cast(x[:, :40], 0.05, META)
    with pytest.raises(ValueError, match="activation 'relu'"):
        split_cast(x, 0.05, META, "relu")
    element = Q.outlier_split(0.05, granularity="element").meta
    with pytest.raises(ValueError, match="element / row"):
        split_cast(x, 0.05, element)
    assert "SMX" in unsupported(Q.outlier_split(0.05, hi="mxfp8_e4m3", lo="mx6").meta)
    assert "multiple of 64" in supports(100, 384, 16) and "blocks of 16" in supports(64, 384, 32)
    with pytest.raises(ValueError, match="multiple of 64"):
        split_cast_gpu(x[:32], jnp.int32(1), META, interpret=True)
    odd = x[:40]  # 40 rows: the op computes the reference
    np.testing.assert_array_equal(_bits(split_cast(odd, 0.05, META, impl="gpu_interpret")), _bits(_want(odd, 0.05, None)))


MLP_SITE = "blocks.0.mlp"


def _mixdit_mlp():
    mlp = layers.Mlp(64, 256, site=MLP_SITE, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 32, 64)).astype(jnp.bfloat16)
    plan = recipes.plan_for("mixdit", trace_operands(lambda x, quant: mlp(x, quant), x))
    return mlp, x, plan.bind(plan.init())


def test_linear_inputs_and_the_mlp_route_to_the_op_as_the_environment_says(monkeypatch):
    """JDQ_SPLIT_CAST=kernel takes the route on any backend (its reference on a CPU): the unfused values, bit for bit."""
    mlp, x, quant = _mixdit_mlp()
    calls = []
    import jdq.kernels.split_cast as sc

    real = sc.split_cast
    monkeypatch.setattr(sc, "split_cast", lambda *a, **kw: calls.append((a[0].shape, a[3] if len(a) > 3 else None))
                        or real(*a, **kw))
    monkeypatch.setenv(layers.SPLIT_CAST_ENV, "xla")
    plain = mlp(x, quant)
    assert not calls
    monkeypatch.setenv(layers.SPLIT_CAST_ENV, "kernel")
    routed = mlp(x, quant)
    assert calls == [((2, 32, 64), None), ((2, 32, 256), "gelu_tanh")]  # fc1's input; fc2's with the GELU
    np.testing.assert_array_equal(_bits(routed), _bits(plain))
    calls.clear()
    monkeypatch.setenv(layers.SPLIT_CAST_ENV, "auto")  # not taken: slower than the row_select route on an H200
    mlp(x, quant)
    assert not calls
    monkeypatch.setenv(layers.SPLIT_CAST_ENV, "fast")
    with pytest.raises(ValueError, match="JDQ_SPLIT_CAST='fast'"):
        mlp(x, quant)


def test_other_casts_keep_their_paths(monkeypatch):
    """An MX6 cast (no split) and a float32 input do not take the route."""
    mlp = layers.Mlp(64, 256, site=MLP_SITE, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 32, 64))
    monkeypatch.setenv(layers.SPLIT_CAST_ENV, "kernel")
    monkeypatch.setattr("jdq.kernels.split_cast.split_cast", lambda *a, **kw: pytest.fail("split_cast taken"))
    for recipe, dtype in (("mx6", jnp.bfloat16), ("mixdit", jnp.float32)):
        xd = x.astype(dtype)
        plan = recipes.plan_for(recipe, trace_operands(lambda x, quant: mlp(x, quant), xd))
        mlp(xd, plan.bind(plan.init()))
