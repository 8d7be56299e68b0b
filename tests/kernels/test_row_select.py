"""row_select: the per-row radix threshold kernel (interpret mode, lowering) and MixDiT's top-k mask on it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import lowers_to_mosaic_gpu

from jdq.kernels import row_select
from jdq.kernels.row_select import ref
from jdq.kernels.row_select.gpu import supports, threshold_gpu
from jdq.models import layers


def _keys(n, rows=128, seed=0, value_bits=16):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 1 << value_bits, (rows, n))
    v[:, ::5] = v[:, :1]  # equal values: the position makes the keys distinct
    v[1] = v[1, 0]  # a row of one value
    return ref.unique_keys(jnp.asarray(v), value_bits)


@pytest.mark.parametrize("n", [8, 72, 96, 288])
def test_kernel_threshold_equals_the_sorted_reference_for_every_edge_k(n):
    keys, bits = _keys(n)
    for k in (-1, 0, 1, 2, n // 7 + 1, n - 1, n, n + 1):
        got = threshold_gpu(keys, jnp.int32(k), bits=bits, interpret=True)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref.threshold(keys, k, bits)), err_msg=f"n={n} k={k}")
    # the selection it defines holds exactly k keys per row
    t = ref.threshold(keys, 5, bits)
    assert np.all(np.asarray((keys >= t[:, None]).sum(1)) == 5)


def test_kernel_takes_a_k_per_row_and_runs_under_vmap():
    keys, bits = _keys(72, rows=64)
    ks = jnp.arange(64, dtype=jnp.int32) % 9
    np.testing.assert_array_equal(np.asarray(threshold_gpu(keys, ks, bits=bits, interpret=True)),
                                  np.asarray(ref.threshold(keys, ks, bits)))
    got = jax.vmap(lambda k: threshold_gpu(keys, k, bits=bits, interpret=True))(jnp.arange(4, dtype=jnp.int32))
    want = jax.vmap(lambda k: ref.threshold(keys, k, bits))(jnp.arange(4, dtype=jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("n", [72, 288, 96, 384])  # DiT / PixArt 1152 and 4608 wide, SD3 1536 and 6144, in blocks of 16
def test_kernel_lowers_to_mosaic_gpu(n):
    bits = 16 + (n - 1).bit_length()
    assert lowers_to_mosaic_gpu(functools.partial(threshold_gpu, bits=bits), ((16384, n), jnp.int32), ((), jnp.int32))
    vmapped = lambda keys, ks: jax.vmap(lambda k: threshold_gpu(keys, k, bits=bits))(ks)  # noqa: E731
    assert lowers_to_mosaic_gpu(vmapped, ((16384, n), jnp.int32), ((3,), jnp.int32))


def test_unsupported_shapes_are_named_and_the_op_falls_back_to_the_reference():
    assert "multiple of 64" in supports(100, 72, 23)
    assert "multiples of 8" in supports(64, 70, 23)
    assert "up to 768" in supports(64, 1024, 26)
    with pytest.raises(ValueError, match="multiple of 64"):
        threshold_gpu(jnp.zeros((100, 72), jnp.int32), jnp.int32(1), bits=23, interpret=True)
    with pytest.raises(ValueError, match=r"\(M, n\) int32"):
        threshold_gpu(jnp.zeros((64, 72), jnp.float32), jnp.int32(1), bits=23, interpret=True)
    with pytest.raises(ValueError, match="exceed 31"):
        ref.unique_keys(jnp.zeros((4, 72), jnp.int32), 25)
    keys, bits = _keys(70, rows=100)  # the op declines these shapes on the kernel and computes the reference
    np.testing.assert_array_equal(np.asarray(row_select.threshold(keys, jnp.int32(3), bits=bits, impl="gpu_interpret")),
                                  np.asarray(ref.threshold(keys, 3, bits)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_top_mask_on_the_kernel_is_rank_below_k_with_ties_and_specials(dtype):
    rng = np.random.default_rng(3)
    n = 288
    v = np.abs(rng.standard_normal((2, 64, n))).astype(np.float32)
    v[:, :, ::4] = v[:, :, :1]  # ties, broken by position
    v[0, 0, :5] = [np.nan, np.inf, 0.0, -0.0, np.nan]
    v[1, 3, :] = 0.0
    v = np.asarray(jnp.asarray(v, dtype).astype(jnp.float32))
    w = np.where(np.isnan(v), -np.inf, v)
    ranks = np.argsort(np.argsort(-w, axis=-1, kind="stable"), axis=-1, kind="stable")
    ks = jnp.asarray([0, 1, 14, 72, n, n + 1], jnp.int32)
    got = jax.vmap(lambda k: row_select.top_mask(jnp.asarray(v, dtype), k, impl="gpu_interpret"))(ks)
    np.testing.assert_array_equal(np.asarray(got), ranks[None] < np.asarray(ks)[:, None, None, None])
    with pytest.raises(ValueError, match="16-bit float"):
        row_select.top_mask(jnp.asarray(v), jnp.int32(3))
    with pytest.raises(ValueError, match="scalar"):
        row_select.top_mask(jnp.asarray(v, dtype), jnp.full((2, 64), 3, jnp.int32))


def _linear_split(x, quant, site="blocks.0.mlp.fc2"):
    w = jnp.ones((x.shape[-1], 8), x.dtype)
    return layers.qlinear(x, w, site=site, quant=quant, act_role="post_gelu")


def _mixdit_fc2(x):
    from jdq import recipes
    from jdq.quant import trace_operands

    plan = recipes.plan_for("mixdit", trace_operands(lambda x, quant: _linear_split(x, quant), x))
    return plan.bind(plan.init())


def test_linear_inputs_route_mixdit_splits_through_the_kernel_as_the_environment_says(monkeypatch):
    """JDQ_ROW_SELECT=kernel takes the route on any backend (its reference on a CPU): the same split, bit for bit."""
    x = (jax.random.normal(jax.random.key(0), (2, 64, 4608)) * 2).astype(jnp.bfloat16)
    quant = _mixdit_fc2(x)
    calls = []
    real = row_select.top_mask
    monkeypatch.setattr(row_select, "top_mask", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    monkeypatch.setenv(layers.ROW_SELECT_ENV, "xla")
    plain = _linear_split(x, quant)
    assert not calls
    monkeypatch.setenv(layers.ROW_SELECT_ENV, "kernel")
    routed = _linear_split(x, quant)
    assert calls == [(2, 64, 288)]  # the block maxima of each token's 4608 inputs
    np.testing.assert_array_equal(np.asarray(routed, np.float32), np.asarray(plain, np.float32))
    monkeypatch.delenv(layers.ROW_SELECT_ENV)
    calls.clear()
    _linear_split(x, quant)
    assert bool(calls) == (jax.default_backend() == "gpu")
    monkeypatch.setenv(layers.ROW_SELECT_ENV, "kernel")
    calls.clear()
    _linear_split(x.astype(jnp.float32), _mixdit_fc2(x.astype(jnp.float32)))  # float32 rows: the plan's own path
    assert not calls
    monkeypatch.setenv(layers.ROW_SELECT_ENV, "fast")
    with pytest.raises(ValueError, match="JDQ_ROW_SELECT='fast'"):
        _linear_split(x, quant)


@pytest.mark.parametrize("batched", ["keys", "k", "both", "nested"])
def test_the_op_under_vmap_folds_the_batch_into_the_kernels_rows(batched):
    """Under ``vmap`` the op runs once on the batch's rows (a k per row): the vmapped reference, bit for bit."""
    keys, bits = _keys(72, rows=64 * 4)
    keys = keys.reshape(4, 64, 72)
    ks = jnp.asarray([0, 3, 9, 72], jnp.int32)
    op = functools.partial(row_select.threshold, bits=bits, impl="gpu_interpret")
    want_op = functools.partial(ref.threshold, bits=bits)
    # each result is materialised before the next op: an eager op while the interpreter's callbacks run can deadlock
    if batched == "keys":
        want, got = np.asarray(jax.vmap(lambda x: want_op(x, 5))(keys)), np.asarray(jax.vmap(lambda x: op(x, jnp.int32(5)))(keys))
    elif batched == "k":
        want, got = np.asarray(jax.vmap(lambda k: want_op(keys[0], k))(ks)), np.asarray(jax.vmap(lambda k: op(keys[0], k))(ks))
    elif batched == "both":
        want, got = np.asarray(jax.vmap(want_op)(keys, ks)), np.asarray(jax.vmap(op)(keys, ks))
    else:
        nested = keys.reshape(2, 2, 64, 72)
        want = np.asarray(jax.vmap(jax.vmap(want_op, in_axes=(0, None)), in_axes=(0, None))(nested, jnp.int32(7)))
        got = np.asarray(jax.vmap(jax.vmap(op, in_axes=(0, None)), in_axes=(0, None))(nested, jnp.int32(7)))
    np.testing.assert_array_equal(got, want)


def test_auto_takes_the_kernel_only_from_one_cta_per_sm_counting_the_vmapped_rows(monkeypatch):
    """``impl="auto"`` on a GPU: the sort below one 64-row CTA per SM, the kernel from there, a vmapped batch counted
    in; an explicit impl is kept. (A 4-SM GPU is simulated: the kernel's slot records its rows and returns the
    reference.)"""
    from jdq.kernels import _mgpu, op
    from jdq.kernels.row_select import api

    calls = []
    monkeypatch.setattr(op, "_auto_is_gpu", lambda: True)
    monkeypatch.setattr(_mgpu, "num_sms", lambda default=132: 4)
    monkeypatch.setitem(api.IMPLEMENTATIONS, "gpu",
                        lambda keys, k, bits, *, impl: calls.append(keys.shape[0]) or ref.threshold(keys, k, bits))
    api._routed.cache_clear()
    keys, bits = _keys(40, rows=128, seed=3)  # a shape no other test traces (the op's jit caches by shape)
    want = ref.threshold(keys, 4, bits)
    np.testing.assert_array_equal(np.asarray(row_select.threshold(keys, jnp.int32(4), bits=bits)), np.asarray(want))
    assert calls == []  # 128 rows = 2 CTAs < 4 SMs: the sort
    got = jax.vmap(lambda k: row_select.threshold(keys, k, bits=bits))(jnp.asarray([4, 4, 4], jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.stack([want] * 3)))
    assert calls == [384]  # 3 x 128 rows in one call: the kernel
    row_select.threshold(keys, jnp.int32(4), bits=bits, impl="gpu")
    assert calls == [384, 128]  # asked for by name: the kernel at any size
    api._routed.cache_clear()


def test_top_mask_on_the_op_is_differentiable_through_its_values():
    """The selection is integer-valued: a gradient through a split that uses it flows to the selected values only."""
    v = (jax.random.normal(jax.random.key(2), (64, 96)) * 3).astype(jnp.bfloat16)

    def loss(x):
        mask = row_select.top_mask(x, 10, impl="gpu_interpret")
        return jnp.sum(jnp.where(mask, x, 0).astype(jnp.float32) ** 2)

    mask = np.asarray(row_select.top_mask(v, 10, impl="xla"))
    g = np.asarray(jax.grad(loss)(v), np.float32)  # materialised at once (see the vmap test above)
    np.testing.assert_array_equal(g != 0, mask & (np.asarray(v, np.float32) != 0))
    jax.block_until_ready(jax.vmap(jax.grad(loss))(jnp.stack([v, -v])))  # and under vmap
