"""Fake-quant attention with the probabilities cast in the kernel: the reference is the explicit path of
``jdq.models.layers.attention``, the Mosaic GPU kernel in interpret mode equals the reference (MX, MX9 /
MX6 / MX4 and no cast), the real kernel lowers to Mosaic GPU at DiT-XL/2 shapes, and a plan's attention
routes to it only for the casts it implements."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import lowers_to_mosaic_gpu, relerr

from jdq import formats, recipes
from jdq.kernels.quant_attention import ProbCast, key_order, prob_cast_of, quant_attention, reference
from jdq.kernels.quant_attention.gpu import Config, quant_attention_gpu
from jdq.models import layers
from jdq.quant import cast, outlier_split, trace_operands

SITE = "blocks.0.attn"


def _cast_operands(key, b=1, h=2, lq=128, lk=128, d=72, fmt="mxfp8_e4m3"):
    """q̂ (B, H, Lq, D), k̂ᵀ (B, H, D, Lk), v̂ (B, H, Lk, D) in bf16, cast along their contraction axes as a plan would."""
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    q = jax.random.normal(k1, (b, h, lq, d)) * 1.5
    kt = jax.random.normal(k2, (b, h, d, lk)) * 1.5
    v = jax.random.normal(k3, (b, h, lk, d))
    spec = formats.get(fmt)
    return (formats.cast(q.astype(jnp.bfloat16), spec, axis=-1), formats.cast(kt.astype(jnp.bfloat16), spec, axis=-2),
            formats.cast(v.astype(jnp.bfloat16), spec, axis=-2))


def _prob(fmt):
    if fmt is None:
        return ProbCast()
    spec = formats.get(fmt)
    return ProbCast("row", spec) if spec.kind == "fp8" else ProbCast(spec.kind, spec)


# Interpreted kernels run host callbacks on XLA's CPU threads; an eager op issued while they ran deadlocked a 2-core
# machine once. tests/conftest.py dispatches synchronously, and these tests also materialise an interpreted result
# (np.asarray / block_until_ready / _agree) before they compute anything else.


def _agree(got, want):
    """Equal but for float reordering: the row sums and P·V sums run in another order than XLA's."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.mean(got[ok] == want[ok]) >= 0.99
    assert relerr(got[ok], want[ok]) < 2e-3


@pytest.mark.parametrize("fmt,block_kv", [("mxfp8_e4m3", 64), ("mxint8", 32), ("mxfp4_e2m1", 128), ("mx6", 32),
                                          ("mx9", 64), ("mx4", 64), ("fp8_e4m3", 64), (None, 64)])
def test_kernel_interpreted_equals_reference(fmt, block_kv):
    qh, kt, vh = _cast_operands(0, fmt=fmt or "mx9")
    prob, scale = _prob(fmt), 1 / math.sqrt(72)
    want = reference(qh, kt, vh, prob, scale)
    got = quant_attention(qh, kt, vh, prob=prob, scale=scale, impl="gpu_interpret", config=Config(block_kv=block_kv))
    _agree(got, want)
    if fmt is not None:  # the cast is really applied: without it the result is another one
        plain = reference(qh, kt, vh, ProbCast(), scale)
        assert relerr(plain, want) > 20 * relerr(got, want) + 1e-4


def test_pair_cast_needs_the_key_order():
    """MX6 pairs neighbouring keys: the kernel reads k and v with each chunk's even keys first."""
    order = np.asarray(key_order(64, 32, pairs=True))
    assert order[:16].tolist() == list(range(0, 32, 2)) and order[16:32].tolist() == list(range(1, 32, 2))
    assert sorted(order.tolist()) == list(range(64))
    assert key_order(64, 64, pairs=False) is None


def test_kernel_layout_is_the_key_order_and_the_padding():
    """The operands' layout pass (reshape + transpose) puts keys in ``key_order`` and zero-pads D."""
    from jdq.kernels.quant_attention.api import _layout

    x = jax.random.normal(jax.random.key(3), (2, 3, 64, 72), jnp.float32)
    want = jnp.pad(jnp.take(x.reshape(6, 64, 72), key_order(64, 32, pairs=True), axis=1), ((0, 0), (0, 0), (0, 8)))
    np.testing.assert_array_equal(np.asarray(_layout(x, False, 80, 32)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(_layout(jnp.swapaxes(x, -1, -2), True, 80, 32)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(_layout(x, False, 72, None)), np.asarray(x.reshape(6, 64, 72)))


def test_nan_rows_and_ragged_shapes():
    qh, kt, vh = _cast_operands(1, lq=96, lk=128, fmt="mx6")
    qh = qh.at[0, 1, 5, 3].set(jnp.nan)
    prob, scale = _prob("mx6"), 0.1
    want = reference(qh, kt, vh, prob, scale)
    got = quant_attention(qh, kt, vh, prob=prob, scale=scale, impl="gpu_interpret")  # Lq = 96: padded to 128
    assert np.isnan(np.asarray(got[0, 1, 5], np.float32)).all()
    _agree(got, want)
    # Lk = 80 does not tile into 32-key chunks: the jitted reference runs, bit for bit (eager softmax may round
    # a probability one bf16 ulp apart from the fused one, which can move an MX6 block's exponent)
    qh, kt, vh = _cast_operands(2, lq=64, lk=80, fmt="mx6")
    jitted_reference = jax.jit(reference, static_argnums=(3, 4))
    np.testing.assert_array_equal(np.asarray(quant_attention(qh, kt, vh, prob=prob, scale=scale, impl="gpu_interpret")),
                                  np.asarray(jitted_reference(qh, kt, vh, prob, scale)))


def test_bad_operands_are_named():
    qh, kt, vh = _cast_operands(3, lq=64, lk=64)
    with pytest.raises(ValueError, match="do not fit"):
        quant_attention(qh, kt[..., :32], vh, prob=ProbCast(), scale=0.1)
    with pytest.raises(ValueError, match="bfloat16"):
        quant_attention_gpu(qh[0].astype(jnp.float32), qh[0], qh[0], scale=0.1, prob=ProbCast())
    with pytest.raises(ValueError, match="head dim 72"):
        quant_attention_gpu(qh[0], qh[0], qh[0], scale=0.1, prob=ProbCast())
    qp = jnp.pad(qh[0], ((0, 0), (0, 0), (0, 8)))  # D = 72 padded to 80, as the api does
    with pytest.raises(ValueError, match="multiple of 32"):
        quant_attention_gpu(qp, qp, qp, scale=0.1, prob=_prob("mx6"), config=Config(block_kv=16))
    with pytest.raises(ValueError, match="format spec"):
        ProbCast("mx")


@pytest.mark.parametrize("fmt,block_kv", [("mxfp8_e4m3", 64), ("mx6", 32), ("mx9", 64), ("fp8_e4m3", 64), (None, 128)])
def test_kernel_lowers_to_mosaic_gpu_at_dit_xl_shapes(fmt, block_kv):
    prob = _prob(fmt)
    fn = lambda q, k, v: quant_attention_gpu(q, k, v, scale=0.1, prob=prob, config=Config(block_kv=block_kv))  # noqa: E731
    shape = ((1024, 256, 80), jnp.bfloat16)  # DiT-XL/2 256 at batch 64: B·H = 1024, L = 256, D = 72 -> 80
    assert lowers_to_mosaic_gpu(fn, shape, shape, shape)


@pytest.mark.parametrize("split", [False, True])  # kept logits with batched WGMMAs: test_kept_logits_lower_...
def test_batched_logit_wgmmas_lower_to_mosaic_gpu_at_dit_xl_shapes(split):
    shape = ((1024, 256, 80), jnp.bfloat16)
    cfg = Config(block_kv=32, split_tiles=split, batch_wgmma=True)
    if split:
        prob = prob_cast_of(outlier_split(0.2))
        fn = lambda q, k, v, r: quant_attention_gpu(q, k, v, scale=0.1, prob=prob, config=cfg, ratio=r)  # noqa: E731
        assert lowers_to_mosaic_gpu(fn, shape, shape, shape, ((), jnp.float32))
    else:
        fn = lambda q, k, v: quant_attention_gpu(q, k, v, scale=0.1, prob=_prob("mx6"), config=cfg)  # noqa: E731
        assert lowers_to_mosaic_gpu(fn, shape, shape, shape)


def test_prob_cast_of_reads_the_plan_transform():
    assert prob_cast_of(None) == ProbCast()
    mx = prob_cast_of(cast("mxfp8_e4m3"))
    assert mx.kind == "mx" and mx.block == 32 and not mx.pairs
    smx = prob_cast_of(cast("mx6"))
    assert smx.kind == "smx" and smx.block == 16 and smx.pairs
    row = prob_cast_of(cast("fp8_e4m3", granularity="row"))
    assert row.kind == "row" and row.block == 1 and not row.pairs
    assert "scales per row" in prob_cast_of(cast("fp8_e4m3", granularity="tensor"))
    assert "block-scaled" in prob_cast_of(cast("int8"))
    with pytest.raises(ValueError, match="granularity 'row'"):
        ProbCast("row", formats.get("mxfp8_e4m3"))
    split = prob_cast_of(outlier_split(0.2))
    assert split.kind == "split" and split.block == 16 and split.pairs and split.spec.name == "mx9"
    assert "element / row" in prob_cast_of(outlier_split(0.2, granularity="element"))
    assert "differ in more" in prob_cast_of(outlier_split(0.2, hi="mx9", lo="mx6", lo_options={"block_size": 32}))
    assert "SMX" in prob_cast_of(outlier_split(0.2, hi="mxfp8_e4m3", lo="mxfp4_e2m1"))
    assert "selection blocks of 32" in prob_cast_of(outlier_split(0.2, block_size=32))
    with pytest.raises(ValueError, match="exactly for kind 'split'"):
        ProbCast("smx", formats.get("mx9"), split.split)


@pytest.mark.parametrize("ratio", [0.2, 0.0, 0.05, 1.0])
@pytest.mark.parametrize("block_kv,tiles", [(32, False), (64, False), (32, True), (64, True)])
def test_split_kernel_interpreted_equals_the_plan_split(ratio, block_kv, tiles):
    """MixDiT's probability split in registers (blocks ranked by max probability after pass 1, the logits in
    one tile or in 16-key tiles) = the plan's outlier split of the explicit path; ratio 0 is MX6 everywhere, 1 MX9."""
    qh, kt, vh = _cast_operands(1, fmt="mx9")
    prob, scale = prob_cast_of(outlier_split(0.2)), 1 / math.sqrt(72)
    r = jnp.float32(ratio)
    want = reference(qh, kt, vh, prob, scale, r)
    got = quant_attention(qh, kt, vh, r, prob=prob, scale=scale, impl="gpu_interpret",
                          config=Config(block_kv=block_kv, split_tiles=tiles))
    _agree(got, want)
    if ratio in (0.0, 1.0):
        whole = reference(qh, kt, vh, ProbCast("smx", formats.get("mx9" if ratio else "mx6")), scale)
        np.testing.assert_array_equal(np.asarray(want, np.float32), np.asarray(whole, np.float32))


def test_split_kernel_runs_under_vmap_over_ratios_and_names_its_limits():
    qh, kt, vh = _cast_operands(2, lq=64, lk=64, fmt="mx9")
    prob, scale = prob_cast_of(outlier_split(0.2)), 0.1
    ratios = jnp.asarray([0.0, 0.3, 1.0], jnp.float32)
    got = jax.block_until_ready(jax.vmap(lambda r: quant_attention(qh, kt, vh, r, prob=prob, scale=scale, impl="gpu_interpret",
                                                                   config=Config(block_kv=32)))(ratios))
    want = jax.vmap(lambda r: reference(qh, kt, vh, prob, scale, r))(ratios)  # after: see the note above _agree
    _agree(got, want)
    assert "at most 256" in Config(block_kv=32).supports(64, 512, 80, prob)
    with pytest.raises(ValueError, match="ratio is given exactly"):
        quant_attention(qh, kt, vh, prob=prob, scale=scale)
    with pytest.raises(ValueError, match="ratio is given exactly"):
        quant_attention(qh, kt, vh, jnp.float32(0.2), prob=ProbCast(), scale=scale)


@pytest.mark.parametrize("tiles", [False, True])
def test_split_kernel_lowers_to_mosaic_gpu_at_dit_xl_shapes(tiles):
    prob = prob_cast_of(outlier_split(0.2))
    cfg = Config(block_kv=32, split_tiles=tiles)
    fn = lambda q, k, v, r: quant_attention_gpu(q, k, v, scale=0.1, prob=prob, config=cfg, ratio=r)  # noqa: E731
    shape = ((1024, 256, 80), jnp.bfloat16)
    assert lowers_to_mosaic_gpu(fn, shape, shape, shape, ((), jnp.float32))


@pytest.mark.parametrize("fmt,block_kv", [("mxfp8_e4m3", 64), ("mx6", 32), ("fp8_e4m3", 64), (None, 32), ("split", 32)])
def test_kept_logits_compute_what_the_recomputed_ones_do(fmt, block_kv):
    """``keep_logits``: pass 2 reads pass 1's bf16 scores from shared memory instead of a second q·kᵀ — the same
    scores, so the same output bit for bit where pass 1's tiles are pass 2's (a pair cast's pass 1 sums its two
    half-chunks in another order: equal but for that)."""
    qh, kt, vh = _cast_operands(4, lq=64, lk=256, fmt="mx9")
    scale = 1 / math.sqrt(72)
    if fmt == "split":
        prob, r, tiles = prob_cast_of(outlier_split(0.2)), jnp.float32(0.2), True
    else:
        prob, r, tiles = _prob(fmt), None, False

    def run(keep):
        cfg = Config(block_kv=block_kv, split_tiles=tiles, keep_logits=keep)
        return np.asarray(quant_attention(qh, kt, vh, r, prob=prob, scale=scale, impl="gpu_interpret", config=cfg),
                          np.float32)

    kept, recomputed = run(True), run(False)
    if prob.pairs and fmt != "split":
        _agree(kept, recomputed)
    else:
        np.testing.assert_array_equal(kept, recomputed)
    _agree(kept, reference(qh, kt, vh, prob, scale, r))


@pytest.mark.parametrize("fmt,tiles,keep", [("mx6", False, False), ("split", True, True)])
def test_batched_logit_wgmmas_compute_the_same_bit_for_bit(fmt, tiles, keep):
    """``batch_wgmma`` only reorders issue and wait of a step's logit WGMMAs (a pair cast's two half-chunks, a split's
    sixteen 16-key tiles): every value is the one the one-by-one order gives."""
    qh, kt, vh = _cast_operands(5, lq=64, lk=256, fmt="mx9")
    prob, r = (prob_cast_of(outlier_split(0.2)), jnp.float32(0.3)) if fmt == "split" else (_prob(fmt), None)

    def run(batch):
        cfg = Config(block_kv=32, split_tiles=tiles, keep_logits=keep, batch_wgmma=batch)
        return np.asarray(quant_attention(qh, kt, vh, r, prob=prob, scale=0.1, impl="gpu_interpret", config=cfg),
                          np.float32)

    np.testing.assert_array_equal(run(True), run(False))


def test_auto_takes_the_kernel_only_where_its_ctas_fill_the_sms_counting_a_vmapped_batch(monkeypatch):
    """``impl="auto"`` on a GPU: the reference below one CTA per SM, the kernel from there, a vmapped batch (here of
    ratios, as a sweep has) counted in; an explicit impl is kept. (A 4-SM GPU is simulated: the kernel's slot records
    its CTAs' batch and returns the reference.)"""
    from jdq.kernels import _mgpu, op
    from jdq.kernels.quant_attention import api

    calls = []
    monkeypatch.setattr(op, "_auto_is_gpu", lambda: True)
    monkeypatch.setattr(_mgpu, "num_sms", lambda default=132: 4)
    monkeypatch.setitem(api.IMPLEMENTATIONS, "gpu", lambda qh, kt, vh, ratio, prob, scale, *, impl, config:
                        calls.append(qh.shape[:2]) or reference(qh, kt, vh, prob, scale, ratio))
    api._routed.cache_clear()
    qh, kt, vh = _cast_operands(6, h=1, lq=128, lk=96, d=40, fmt="mx9")  # a shape no other test traces: 2 CTAs
    prob = prob_cast_of(outlier_split(0.2))
    want = jax.jit(reference, static_argnums=(3, 4))(qh, kt, vh, prob, 0.1, jnp.float32(0.25))  # as the op compiles it
    _agree(quant_attention(qh, kt, vh, jnp.float32(0.25), prob=prob, scale=0.1), want)
    assert calls == []  # 2 CTAs < 4 SMs: the reference
    ratios = jnp.asarray([0.25, 0.25, 0.25], jnp.float32)
    got = jax.vmap(lambda r: quant_attention(qh, kt, vh, r, prob=prob, scale=0.1))(ratios)
    _agree(got, jnp.stack([want] * 3))
    assert calls == [(1, 1)]  # 3 x 2 CTAs: the kernel (traced once, unbatched shapes inside the vmap)
    quant_attention(qh, kt, vh, jnp.float32(0.25), prob=prob, scale=0.1, impl="gpu")
    assert calls == [(1, 1), (1, 1)]  # asked for by name: the kernel at any size
    api._routed.cache_clear()


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_the_rank_network_sorts_every_input(n):
    """Batcher's odd–even merge sort: by the 0–1 principle, a comparator network sorts every input if it sorts every
    sequence of zeros and ones."""
    from jdq.kernels.quant_attention.gpu import merge_sort_pairs

    x = (np.arange(1 << n)[:, None] >> np.arange(n)[None, :]) & 1
    for a, b in merge_sort_pairs(n):
        x[:, a], x[:, b] = np.maximum(x[:, a], x[:, b]), np.minimum(x[:, a], x[:, b])
    assert np.all(np.diff(x, axis=1) <= 0)
    assert len(merge_sort_pairs(16)) == 63


@pytest.mark.parametrize("lk,ratio,ties", [(256, 0.2, False), (256, 1.0, False), (256, 0.05, True), (96, 0.5, False)])
def test_sorted_ranks_select_the_blocks_counted_ranks_do(lk, ratio, ties):
    """``sort_ranks``: the split's blocks ranked by a sorting network = ranked by counting, bit for bit, with ties (all
    logits equal: the earliest blocks win) and a block count that is not a power of two (Lk = 96: 6 blocks)."""
    qh, kt, vh = _cast_operands(7, lq=64, lk=lk, fmt="mx9")
    if ties:
        qh = jnp.zeros_like(qh)
    prob, r = prob_cast_of(outlier_split(0.2)), jnp.float32(ratio)

    def run(sort):
        cfg = Config(block_kv=32, split_tiles=True, keep_logits=True, sort_ranks=sort)
        return np.asarray(quant_attention(qh, kt, vh, r, prob=prob, scale=0.1, impl="gpu_interpret", config=cfg),
                          np.float32)

    got = run(True)
    np.testing.assert_array_equal(got, run(False))
    _agree(got, reference(qh, kt, vh, prob, 0.1, r))


@pytest.mark.parametrize("ratio,block_kv,keep,sort", [(0.2, 32, True, False), (1.0, 32, True, False),
                                                      (0.05, 64, False, False), (0.2, 32, True, True)])
def test_streamed_split_pass_1_computes_the_plan_split(ratio, block_kv, keep, sort):
    """``split_stream``: pass 1 over k in chunks (running max and sum, each chunk's block maxima into the carry) =
    the plan's split up to the row sums' order, and it names what it needs. (The last case is the tuned split's
    config: streamed, kept logits, ranks by the sorting network.)"""
    qh, kt, vh = _cast_operands(8, lq=64, lk=256, fmt="mx9")
    prob, r = prob_cast_of(outlier_split(0.2)), jnp.float32(ratio)
    cfg = Config(block_kv=block_kv, split_tiles=True, keep_logits=keep, split_stream=True, sort_ranks=sort)
    want = reference(qh, kt, vh, prob, 0.1, r)  # first: an eager op while the interpreter's callbacks run can deadlock
    got = quant_attention(qh, kt, vh, r, prob=prob, scale=0.1, impl="gpu_interpret", config=cfg)
    _agree(got, want)
    assert "needs split_tiles" in Config(block_kv=32, split_stream=True).supports(64, 256, 80, prob)


def test_kept_logits_name_their_limits_and_the_tuned_config_drops_them_where_they_do_not_fit(monkeypatch):
    from jdq.kernels import tuning
    from jdq.kernels.quant_attention.api import _config

    split = prob_cast_of(outlier_split(0.2))
    assert "exceed" in Config(keep_logits=True).supports(64, 1024, 80, _prob("mxfp8_e4m3"))
    assert Config(keep_logits=True).supports(64, 512, 80, _prob("mxfp8_e4m3")) is None
    assert "split_tiles" in Config(block_kv=32, keep_logits=True).supports(64, 256, 80, split)
    assert "block_kv=32" in Config(block_kv=64, split_tiles=True, keep_logits=True).supports(64, 256, 80, split)
    rows = {"default": [(tuning.INF, dict(block_q=64, block_kv=64, stages=2, keep_logits=True))]}
    monkeypatch.setitem(tuning.TABLES, "quant_attention", rows)
    assert _config(256, _prob("mxfp8_e4m3")).keep_logits
    assert not _config(4096, _prob("mxfp8_e4m3")).keep_logits  # PixArt-Σ-1024's 4096 keys: recomputed
    assert _config(256, _prob("mx6")) == Config(block_kv=64, keep_logits=True)


@pytest.mark.parametrize("fmt,block_kv,batch", [("mxfp8_e4m3", 64, False), ("mx6", 32, False), ("split", 32, False),
                                               ("mx6", 64, True), ("split", 32, True)])
def test_kept_logits_lower_to_mosaic_gpu_at_dit_xl_shapes(fmt, block_kv, batch):
    """(The split with batched WGMMAs also ranks its blocks by the sorting network and streams its pass 1.)"""
    shape = ((1024, 256, 80), jnp.bfloat16)
    if fmt == "split":
        cfg = Config(block_kv=32, split_tiles=True, keep_logits=True, batch_wgmma=batch, sort_ranks=batch,
                     split_stream=batch)
        prob = prob_cast_of(outlier_split(0.2))
        fn = lambda q, k, v, r: quant_attention_gpu(q, k, v, scale=0.1, prob=prob, config=cfg, ratio=r)  # noqa: E731
        assert lowers_to_mosaic_gpu(fn, shape, shape, shape, ((), jnp.float32))
    else:
        cfg, prob = Config(block_kv=block_kv, keep_logits=True, batch_wgmma=batch), _prob(fmt)
        fn = lambda q, k, v: quant_attention_gpu(q, k, v, scale=0.1, prob=prob, config=cfg)  # noqa: E731
        assert lowers_to_mosaic_gpu(fn, shape, shape, shape)


def _attn(q, k, v, quant):
    return layers.attention(q, k, v, site=SITE, quant=quant)


def _jitted_attn(q, k, v, quant):
    """The attention traced afresh (the path is chosen at trace time) and compiled without excess precision:
    by default XLA may keep a bf16 cast's result in float32 inside one fusion and not another, so two programs
    that compute the same function can round differently."""
    fn = jax.jit(lambda q, k, v: _attn(q, k, v, quant))
    return fn.lower(q, k, v).compile({"xla_allow_excess_precision": False})(q, k, v)


@pytest.mark.parametrize("recipe", ["mx6", "mxfp8_e4m3", "w8a8-fp8attn", "mixdit"])
def test_attention_routes_mx_plans_through_the_fused_path(recipe, monkeypatch):
    """``JDQ_QUANT_ATTENTION=kernel`` takes the fused path wherever the plan allows (its XLA reference on a CPU):
    the same function as the explicit path, bit for bit, so the routing applies the plan's own q / k / v casts.
    k holds small integers whose token mean is an integer (tokens 32… mirror tokens …31 about 3), so the mean
    ``w8a8-fp8attn`` subtracts is exact in any summation order (the fused path sums along another axis)."""
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    q, k, v = (jax.random.normal(kk, (1, 64, 2, 72)).astype(jnp.bfloat16) for kk in (k1, k2, k3))
    half = jnp.round(k[:, :32].astype(jnp.float32) * 4)
    k = jnp.concatenate([half, 6.0 - half], axis=1).astype(jnp.bfloat16)
    plan = recipes.plan_for(recipe, trace_operands(_attn, q, k, v))
    quant = plan.bind(plan.init())
    monkeypatch.setenv(layers.QUANT_ATTENTION_ENV, "xla")
    explicit = _jitted_attn(q, k, v, quant)
    calls = []
    monkeypatch.setattr("jdq.kernels.quant_attention.quant_attention",
                        lambda *a, **kw: calls.append((kw["prob"], kw["impl"])) or quant_attention(*a, **kw))
    monkeypatch.setenv(layers.QUANT_ATTENTION_ENV, "kernel")
    fused = _jitted_attn(q, k, v, quant)
    assert len(calls) == 1 and calls[0][0].spec.name == {"w8a8-fp8attn": "fp8_e4m3", "mixdit": "mx9"}.get(recipe, recipe)
    assert calls[0][1] == "auto"
    np.testing.assert_array_equal(np.asarray(fused, np.float32), np.asarray(explicit, np.float32))
    # `reference`: the same casts, then the op's XLA reference (what the kernel computes) on any backend
    monkeypatch.setenv(layers.QUANT_ATTENTION_ENV, "reference")
    np.testing.assert_array_equal(np.asarray(_jitted_attn(q, k, v, quant), np.float32), np.asarray(explicit, np.float32))
    assert len(calls) == 2 and calls[1] == (calls[0][0], "xla")
    monkeypatch.setenv(layers.QUANT_ATTENTION_ENV, "bogus")
    with pytest.raises(ValueError, match="JDQ_QUANT_ATTENTION='bogus'; use auto, xla, kernel or reference"):
        _attn(q, k, v, quant)


class _Recording(layers.QuantizerBase):
    """A bound plan that records the (role, shape, axis) of every operand it casts."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, x, site, role, axis=-1):
        self.calls.append((role, x.shape, axis))
        return self.inner(x, site, role, axis)

    def quantizes(self, site, role):
        return self.inner.quantizes(site, role)

    def transform_for(self, site, role):
        return self.inner.transform_for(site, role)


@pytest.mark.parametrize("recipe,k_layout", [("mx6", "bhld"), ("w8a8-fp8attn", "bhld"), ("bos-mx6", "bhdl")])
def test_fused_path_casts_k_in_the_kernel_layout_when_the_cast_allows(recipe, k_layout, monkeypatch):
    """Casts and token centring of k run on (B, H, Lk, D) along D (the kernel's layout); a transform that indexes
    the (B, H, D, Lk) layout (the BOS key kept in float) gets that layout."""
    from jdq import quant as Q
    from jdq.quant.bos import first_token_float

    k1, k2, k3 = jax.random.split(jax.random.key(6), 3)
    q, k, v = (jax.random.normal(kk, (1, 64, 2, 72)).astype(jnp.bfloat16) for kk in (k1, k2, k3))
    ops = trace_operands(_attn, q, k, v)
    if recipe == "bos-mx6":
        rules = [Q.rule(f"re:{SITE}\\.qk", first_token_float(cast("mx6")), roles=("k",)),
                 Q.rule(f"re:{SITE}\\..*", cast("mx6"), roles=("q", "v", "attn_prob"))]
        plan = Q.resolve(rules, ops)
    else:
        plan = recipes.plan_for(recipe, ops)
    state = plan.init({f"{SITE}.qk:k": {"bos": jnp.zeros((2, 72))}} if recipe == "bos-mx6" else None)
    rec = _Recording(plan.bind(state))
    monkeypatch.setenv(layers.QUANT_ATTENTION_ENV, "kernel")
    _attn(q, k, v, rec)
    (shape, axis), = [(s, a) for role, s, a in rec.calls if role == "k"]
    d = 80 if recipe == "mx6" else 72  # an MX block cast takes k zero-padded to the kernel's head dim
    assert (shape, axis) == (((1, 2, 64, d), -1) if k_layout == "bhld" else ((1, 2, 72, 64), -2))


class _RecordingWithState(_Recording):
    """:class:`_Recording` that also exposes the plan's state (a split's ratio), so the fused path takes splits."""

    def state_for(self, site, role):
        return self.inner.state_for(site, role)


@pytest.mark.parametrize("recipe,padded", [("mx6", True), ("mxfp8_e4m3", True), ("mixdit", True), ("w8a8-fp8attn", False)])
def test_fused_path_pads_the_head_dim_first_where_the_casts_allow_and_computes_the_same(recipe, padded, monkeypatch):
    """Block casts and MixDiT's block splits see q / k / v zero-padded from 72 to the kernel's 80 channels
    (``JDQ_ATTENTION_PAD``, default ``auto``): the same output bit for bit as the casts on 72 (``xla``); a per-row
    FP8 cast with its token centring keeps 72."""
    k1, k2, k3 = jax.random.split(jax.random.key(8), 3)
    q, k, v = (jax.random.normal(kk, (1, 64, 2, 72)).astype(jnp.bfloat16) for kk in (k1, k2, k3))
    plan = recipes.plan_for(recipe, trace_operands(_attn, q, k, v))
    bound = plan.bind(plan.init())
    monkeypatch.setenv(layers.QUANT_ATTENTION_ENV, "kernel")
    monkeypatch.setenv(layers.ATTENTION_PAD_ENV, "xla")
    plain = _jitted_attn(q, k, v, bound)
    monkeypatch.setenv(layers.ATTENTION_PAD_ENV, "auto")
    rec = _RecordingWithState(bound)
    _attn(q, k, v, rec)
    assert {s[-1] for r, s, _ in rec.calls if r in ("q", "v")} == {80 if padded else 72}
    np.testing.assert_array_equal(np.asarray(_jitted_attn(q, k, v, bound), np.float32), np.asarray(plain, np.float32))
    assert not layers._zero_pad_neutral(bound, f"{SITE}.qk", "q", 72, 104) or recipe != "mixdit"  # 5 blocks -> 7


@pytest.mark.parametrize("recipe,barrier", [("mx6", False), ("mxfp8_e4m3", False), ("w8a8-fp8attn", True)])
def test_fused_path_copies_q_k_v_first_only_for_casts_that_reduce_along_tokens(recipe, barrier, monkeypatch):
    """Token centring and dynamic scales (w8a8-fp8attn) get q / k / v copied to (B, H, L, D) behind an
    optimization barrier before their casts; MX block casts take the transpose into their fusions."""
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    q, k, v = (jax.random.normal(kk, (1, 64, 2, 72)).astype(jnp.bfloat16) for kk in (k1, k2, k3))
    plan = recipes.plan_for(recipe, trace_operands(_attn, q, k, v))
    bound = plan.bind(plan.init())
    monkeypatch.setenv(layers.QUANT_ATTENTION_ENV, "kernel")
    jaxpr = jax.make_jaxpr(lambda q, k, v: _attn(q, k, v, bound))(q, k, v)
    assert ("optimization_barrier" in str(jaxpr)) == barrier
    assert layers._reduces_along_tokens(bound, f"{SITE}.qk", f"{SITE}.pv") == barrier


def test_attention_keeps_the_explicit_path_for_other_casts(monkeypatch):
    """An element-wise outlier split of the probabilities (ranked over the row's elements), and a quantizer that
    does not expose a split's state: the explicit path runs."""
    from jdq import quant as Q

    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    q, k, v = (jax.random.normal(kk, (1, 64, 2, 72)).astype(jnp.bfloat16) for kk in (k1, k2, k3))
    ops = trace_operands(_attn, q, k, v)
    element = Q.resolve([Q.rule(f"re:{SITE}\\..*", Q.outlier_split(0.2, granularity="element"))], ops)
    monkeypatch.setenv(layers.QUANT_ATTENTION_ENV, "kernel")
    monkeypatch.setattr("jdq.kernels.quant_attention.quant_attention", lambda *a, **kw: pytest.fail("fused path taken"))
    _attn(q, k, v, element.bind(element.init()))
    mixdit = recipes.plan_for("mixdit", ops)
    _attn(q, k, v, _Recording(mixdit.bind(mixdit.init())))  # transform_for, but no state_for


def test_benchmark_render(load_benchmark):
    qb = load_benchmark("quant_attention")
    res = {"jax": "x", "device": "d", "checks": {"dit.b64@mx6": {"ok": True, "relerr_vs_explicit": 1e-4}},
           "rows": {"dit.b64": {"gflop": 19.3, "us": {"cudnn_bf16": 100.0, "explicit:mx6": 400.0, "fused:mx6": 200.0},
                                "errors": {"kernel:mx6": "ValueError: do not fit"}}}}
    md = qb.render(res)
    assert "| dit.b64 | fused:mx6 | 200.0 | 96 | 0.50 | 2.00 |" in md and "failed: ValueError" in md


@pytest.mark.slow
def test_benchmark_tiny_run_checks_the_fused_path(load_benchmark, tmp_path):
    """The --tiny CPU run checks the fused path against the explicit one and times every variant."""
    import json

    qb = load_benchmark("quant_attention")
    before = os.environ.get(layers.QUANT_ATTENTION_ENV)
    assert qb.main(["--tiny", "--out", str(tmp_path), "--formats", "mx6"]) == 0
    res = json.loads((tmp_path / "quant_attention.json").read_text())
    assert res["checks"]["tiny@mx6"]["ok"], res["checks"]
    assert {"xla_bf16", "kernel_nocast", "fused:mx6", "kernel:mx6", "explicit:mx6"} <= set(res["rows"]["tiny"]["us"])
    assert os.environ.get(layers.QUANT_ATTENTION_ENV) == before  # the benchmark restores the environment


def test_the_op_is_differentiable_as_the_reference():
    """Gradients through the kernel (interpret mode) are the reference's: its tangent, the casts straight-through."""
    qh, kt, vh = _cast_operands(9, lq=64, lk=64)
    prob, scale = _prob("mxfp8_e4m3"), 1 / math.sqrt(72)
    w = jax.random.normal(jax.random.key(10), qh.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    got = jax.block_until_ready(jax.grad(loss(lambda q, k, v: quant_attention(q, k, v, prob=prob, scale=scale,
                                                                             impl="gpu_interpret")),
                                         argnums=(0, 1, 2))(qh, kt, vh))
    want = jax.jit(jax.grad(loss(lambda q, k, v: reference(q, k, v, prob, scale)), argnums=(0, 1, 2)))(qh, kt, vh)
    for g, r in zip(got, want):  # both compiled (see _jitted_attn): same program, XLA may round differently
        assert np.mean(np.asarray(g) == np.asarray(r)) >= 0.99 and relerr(g, r) < 1e-3


def test_benchmark_parse_config(load_benchmark):
    qb = load_benchmark("quant_attention")
    assert qb.parse_config("32s2t") == Config(block_kv=32, stages=2, split_tiles=True)
    assert qb.parse_config("64s3") == Config(block_kv=64, stages=3)
    assert qb.parse_config("32s2tk") == Config(block_kv=32, stages=2, split_tiles=True, keep_logits=True)
    assert qb.parse_config("32s2tkb") == Config(block_kv=32, stages=2, split_tiles=True, keep_logits=True, batch_wgmma=True)
    assert qb.parse_config("32s2tkr") == Config(block_kv=32, stages=2, split_tiles=True, keep_logits=True, sort_ranks=True)
    assert qb.parse_config("32s2tkp") == Config(block_kv=32, stages=2, split_tiles=True, keep_logits=True, split_stream=True)
    with pytest.raises(SystemExit, match="cannot parse"):
        qb.parse_config("32s2tt")
    with pytest.raises(SystemExit, match="cannot parse"):
        qb.parse_config("64x2")
