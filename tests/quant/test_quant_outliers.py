"""MixDiT outlier split: selection, realised fraction, emulation vs a two-GEMM kernel, vmap over ratios."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import formats
from jdq import quant as Q
from jdq.quant.outliers import channel_permutation, outlier_fraction, outlier_mask, outlier_split, outlier_weight

from quant_toy import heavy, toy, toy_block

ACT = Q.Context("blocks.0.attn.qkv", "act", -1)


def channel_stats(x, axis=-1):
    return Q.stack_stats([Q.operand_stats(x, axis)])


def test_realised_fraction_is_within_one_unit_of_the_ratio():
    x = heavy(0, (3, 10, 256))
    ratios = jnp.array([0.0, 0.01, 0.05, 0.2, 0.5, 1.0])
    cases = [("element", "row", 1 / 256), ("element", "tensor", 1 / x.size), ("block", "row", 16 / 256),
             ("block", "tensor", 16 / x.size), ("channel", "row", 16 / 256)]
    for gran, scope, unit in cases:
        t = outlier_split(0.05, granularity=gran, scope=scope)
        state = t.init(channel_stats(x))
        fractions = jax.jit(jax.vmap(lambda r: outlier_fraction(t.meta, x, dict(state, ratio=r))))(ratios)
        assert np.all(np.abs(np.asarray(fractions) - np.asarray(ratios)) <= unit / 2 + 1e-7), (gran, scope, fractions)


def test_selected_elements_and_blocks_are_the_largest():
    x = heavy(1, (6, 128))
    state = {"ratio": jnp.float32(0.1)}
    m = np.asarray(outlier_mask(outlier_split(0.1, granularity="element").meta, x, state))
    a = np.abs(np.asarray(x))
    for r in range(6):  # per row: every outlier at least as large as every other element
        assert m[r].sum() == 13 and a[r][m[r]].min() >= a[r][~m[r]].max()
    mb = np.asarray(outlier_mask(outlier_split(0.25, granularity="block").meta, x, {"ratio": jnp.float32(0.25)}))
    bmax = a.reshape(6, 8, 16).max(-1)
    chosen = mb.reshape(6, 8, 16)
    assert np.all(chosen.all(-1) | ~chosen.any(-1))  # whole blocks
    for r in range(6):
        sel = chosen[r].all(-1)
        assert sel.sum() == 2 and bmax[r][sel].min() >= bmax[r][~sel].max()


def test_channel_outliers_come_from_calibration_and_axis():
    w_in, c = 64, 48
    x = heavy(2, (4, c))
    t = outlier_split(0.34, granularity="channel")  # 0.34*48 = 16.3 -> one block of 16 channels
    state = t.init(channel_stats(x))
    top = set(np.argsort(-np.abs(np.asarray(x)).max(0), kind="stable")[:16].tolist())
    mask = np.asarray(outlier_mask(t.meta, x, state))
    assert set(np.nonzero(mask[0])[0].tolist()) == top and np.all(mask == mask[0])
    perm = np.asarray(channel_permutation(state, 16))
    assert set(perm[:16].tolist()) == top and list(perm[:16]) == sorted(perm[:16]) and list(perm[16:]) == sorted(perm[16:])
    with pytest.raises(ValueError, match="48 channel ranks for 64 channels"):
        t.apply(jnp.ones((2, w_in)), state, ACT)


def test_ratio_zero_and_one_reduce_to_single_formats():
    x = heavy(3, (4, 64))
    lo, hi = jax.jit(lambda v: (formats.cast(v, "mx6"), formats.cast(v, "mx9")))(x)
    for gran in ("element", "block", "channel"):
        t = outlier_split(0.0, granularity=gran)
        state = t.init(channel_stats(x))
        f = jax.jit(jax.vmap(lambda r: t.apply(x, dict(state, ratio=r), ACT)))
        out = f(jnp.array([0.0, 1.0]))
        np.testing.assert_array_equal(out[0], lo)
        np.testing.assert_array_equal(out[1], hi)


def test_element_split_computes_low_block_scales_without_the_outliers():
    x = heavy(4, (8, 256))
    t = outlier_split(0.02, granularity="element")
    state = t.init({})

    @jax.jit
    def both(x):
        m = outlier_mask(t.meta, x, state)
        zero = jnp.zeros_like(x)
        ref = jnp.where(m, formats.cast(jnp.where(m, x, zero), "mx9"), formats.cast(jnp.where(m, zero, x), "mx6"))
        return t.apply(x, state, ACT), ref, formats.cast(x, "mx6")

    y, ref, all_lo = both(x)
    np.testing.assert_array_equal(y, ref)
    err = lambda v: float(jnp.mean((v - x) ** 2))
    assert err(y) < 0.5 * err(all_lo)  # outliers no longer inflate the MX6 blocks


def test_channel_split_equals_a_permuted_two_gemm_kernel():
    """Fake-quant path == a kernel that gathers outlier channels first and runs an MX9 and an MX6 GEMM."""
    c, n = 96, 40
    x = heavy(5, (12, c))
    w = jnp.asarray(np.random.default_rng(6).standard_normal((c, n)), jnp.float32) / c**0.5
    act = outlier_split(0.2, granularity="channel")  # 0.2*96 = 19.2 -> 16 channels (one block)
    wt = outlier_weight(Q.cast("mx6"), 0.2, channel_multiple=16)
    sa = act.init(channel_stats(x))
    sw = wt.init({"act_absmax_channel": channel_stats(x)["absmax_channel"]})

    @jax.jit
    def both(x, w):
        got = act.apply(x, sa, ACT) @ wt.apply(w, sw, Q.Context("blocks.0.attn.qkv", "weight", -2))
        perm = channel_permutation(sa, 16)
        xp, wp = x[:, perm], formats.cast(w[perm], "mx6", axis=-2)
        kernel = formats.cast(xp[:, :16], "mx9") @ wp[:16] + formats.cast(xp[:, 16:], "mx6") @ wp[16:]
        # quantizing the weight in its original channel order is a different (non-kernel) result
        naive = act.apply(x, sa, ACT) @ formats.cast(w, "mx6", axis=-2)
        return got, kernel, naive

    got, kernel, naive = both(x, w)
    np.testing.assert_allclose(got, kernel, rtol=1e-5, atol=1e-5)
    assert not np.allclose(naive, kernel, rtol=1e-5, atol=1e-5)


def test_vmap_over_eight_outlier_ratios_in_one_jit_equals_eight_calls():
    p, x = toy()
    ops = Q.trace_operands(toy_block, p, x)
    rules = [
        Q.rule("attn.qk", outlier_split(0.2, granularity="element"), roles=("q", "k")),
        Q.rule("mlp.fc*", outlier_split(0.05, granularity="block"), roles=Q.ACTIVATION_ROLES),
        Q.keep_float("*"),
    ]
    plan = Q.resolve(rules, ops)
    assert not plan.uncovered() and not plan.unmatched_rules() and len(plan.quantized_keys) == 4
    base = plan.init()
    ratios = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
    states = [Q.set_outlier_ratio(plan, base, r) for r in ratios]
    traces = []

    def run(s):
        traces.append(1)
        return toy_block(p, x, quant=plan.bind(s))

    many = jax.jit(jax.vmap(run))(Q.stack_states(states))
    assert many.shape == (8,) + x.shape and len(traces) == 1
    single = jax.jit(run)
    for r, s, out in zip(ratios, states, many):
        # batched vs unbatched matmuls may sum in another order (~1e-6); a different code would be >1e-3
        np.testing.assert_allclose(out, single(s), rtol=1e-5, atol=1e-5, err_msg=f"ratio {r}")
    assert len(traces) == 2  # the 8 single calls compiled once too: the ratio is state, not static
    err = [float(jnp.mean((o - toy_block(p, x)) ** 2)) for o in many]
    assert err[-1] < err[0]  # all MX9 is more accurate than all MX6


def test_set_outlier_ratio_reaches_nested_stages():
    t = Q.chain(Q.ChannelBalance().act(outlier_split(0.05)), Q.identity())
    state = ({"s": jnp.ones(4), "inner": {"ratio": jnp.float32(0.05)}}, ())
    found = Q.find_stages(t.meta, state, "outlier_split")
    assert len(found) == 1 and float(found[0][1]["ratio"]) == pytest.approx(0.05)

    class OnePlan:  # the two attributes set_outlier_ratio reads
        quantized_keys = ("a:act",)

        @staticmethod
        def transform_for(key):
            return t

    new = Q.set_outlier_ratio(OnePlan, {"a:act": state}, 0.3)
    assert float(new["a:act"][0]["inner"]["ratio"]) == pytest.approx(0.3)
    assert float(state[0]["inner"]["ratio"]) == pytest.approx(0.05)  # input untouched


def test_bad_outlier_options_are_named():
    with pytest.raises(ValueError, match="ratio"):
        outlier_split(1.5)
    with pytest.raises(ValueError, match="granularity"):
        outlier_split(granularity="token")
    with pytest.raises(ValueError, match="unknown format"):
        outlier_split(hi="mx10")
    with pytest.raises(KeyError, match="absmax_channel"):
        outlier_split(granularity="channel").init({})


def test_pairwise_ranks_equal_sorted_ranks_with_ties_and_nan():
    """Short rows are ranked by an elementwise pairwise count; the result must equal numpy's double argsort."""
    from jdq.quant.outliers import _UNROLLED_RANK_ANY, _ranks

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 40, _UNROLLED_RANK_ANY, _UNROLLED_RANK_ANY + 1):
        v = np.abs(rng.standard_normal((4, n))).astype(np.float32)
        v[:, ::3] = v[:, :1]  # ties, broken by position
        if n > 3:
            v[1, 2] = np.nan  # ranks last
            v[2, 0] = 0.0
        order = np.argsort(-v, axis=-1, kind="stable")
        expected = np.argsort(order, axis=-1, kind="stable")
        np.testing.assert_array_equal(np.asarray(_ranks(jnp.asarray(v))), expected)


def test_top_mask_equals_rank_below_k_on_both_paths():
    """The sort-and-threshold selection (long rows) and the elementwise rank count (short rows) pick exactly ``rank < k``."""
    import jax

    from jdq.quant.outliers import _UNROLLED_RANK_MAX, _top_mask_radix, _top_mask_sorted, _top_mask_unrolled, top_mask

    rng = np.random.default_rng(1)
    for n in (1, 5, 16, 72, 100, _UNROLLED_RANK_MAX + 7):  # short, CPU-only count, sorted
        v = np.abs(rng.standard_normal((3, 2, n))).astype(np.float32)
        v[:, :, ::4] = v[:, :, :1]  # ties at the threshold, broken by position
        v[1, 0, -1] = np.nan
        v[2, 1, :] = 0.0  # a row of equal entries
        ranks = np.argsort(np.argsort(-v, axis=-1, kind="stable"), axis=-1, kind="stable")  # NaN sorts last
        want = ranks[None] < np.arange(n + 2)[:, None, None, None]  # every k from 0 to n + 1
        radix_col = functools.partial(_top_mask_radix, candidates_minor=True, digit_bits=3)
        radix_col.__name__ = "radix, candidates minor, 3-bit digits"
        for fn in (_top_mask_sorted, _top_mask_unrolled, _top_mask_radix, radix_col, top_mask):
            got = np.asarray(jax.jit(fn)(jnp.asarray(v), jnp.int32(n // 2)))  # k unbatched
            np.testing.assert_array_equal(got, want[n // 2], err_msg=f"{fn.__name__} n={n}")
            # k batched, as a vmapped sweep over ratios has it
            got = np.asarray(jax.jit(jax.vmap(fn, in_axes=(None, 0)))(jnp.asarray(v), jnp.arange(n + 2, dtype=jnp.int32)))
            np.testing.assert_array_equal(got, want, err_msg=f"{fn.__name__} n={n}, every k")


def _masked_two_casts(x, mask, hi, lo, axis):
    """The split's definition: hi's scales from the outliers alone, lo's from the rest."""
    zero = jnp.zeros((), x.dtype)
    return jnp.where(mask, formats.cast(jnp.where(mask, x, zero), hi, axis=axis),
                     formats.cast(jnp.where(mask, zero, x), lo, axis=axis))


@pytest.mark.parametrize("gran,hi,lo,fused", [
    ("block", "mx9", "mx6", True), ("channel", "mx9", "mx6", True), ("block", "mxfp8_e4m3", "mxfp4_e2m1", True),
    ("block", "mxfp8_e4m3", "mx6", False),  # 32-wide MX blocks straddle the 16-wide selection blocks
    ("element", "mx9", "mx6", False), ("block", "int8", "mx6", False)])
def test_split_cast_equals_the_masked_two_cast_definition(gran, hi, lo, fused):
    """Whole-block selections take one selected cast of x (one pass for MX9 / MX6), the same values bit for bit."""
    from jdq.quant.outliers import _blocks_inside_units

    block = 32 if hi.startswith("mxfp") and lo.startswith("mxfp") else 16
    x = np.array(heavy(7, (2, 3, 96)), np.float32)
    x[0, 0, 5], x[1, 2, 40], x[1, 1, :16] = np.nan, np.inf, 0.0  # a NaN / Inf block, an all-zero block
    for dtype, axis in ((jnp.bfloat16, -1), (jnp.float32, -1), (jnp.bfloat16, 1)):
        xa = jnp.asarray(np.moveaxis(x, -1, axis), dtype)
        t = outlier_split(0.3, hi=hi, lo=lo, granularity=gran, block_size=block)
        assert _blocks_inside_units(t.meta) == fused
        state = t.init(channel_stats(xa, axis))
        ctx = Q.Context("blocks.0.attn.qkv", "act", axis)
        got = jax.jit(lambda v: t.apply(v, state, ctx))(xa)
        if gran == "channel":  # the definition in the kernel's channel order, permuted back
            perm = channel_permutation(state, t.meta.channel_multiple)
            xp = jnp.take(xa, perm, axis=axis)
            mp = jnp.take(outlier_mask(t.meta, xa, state, axis), perm, axis=axis)
            want = jnp.take(_masked_two_casts(xp, mp, hi, lo, axis), jnp.argsort(perm), axis=axis)
        else:
            want = _masked_two_casts(xa, outlier_mask(t.meta, xa, state, axis), hi, lo, axis)
        got, want = (np.asarray(a.astype(jnp.float32)) for a in (got, want))
        np.testing.assert_array_equal(got, want, err_msg=f"{dtype} axis={axis}")
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_radix_top_mask_orders_signed_values_and_specials_as_the_comparisons_do(dtype):
    """The radix selection's integer keys order negatives, ±0, ±inf and NaN (as -inf) as the float comparisons do."""
    import jax

    from jdq.quant.outliers import _top_mask_radix

    rng = np.random.default_rng(2)
    n = 41
    v = rng.standard_normal((5, n)).astype(np.float32) * 3
    v[0, :] = [np.nan, -np.inf, np.inf, -0.0, 0.0] * 8 + [1.0]
    v[1, ::2] = -0.0  # -0 ties +0, broken by position
    v[1, 1::2] = 0.0
    v[2, :] = np.nan  # NaN ties -inf: all tied, taken by position
    v[3, ::5] = v[3, 1]  # ties of a negative value
    v = np.asarray(jnp.asarray(v, dtype).astype(jnp.float32))  # what the dtype can hold
    w = np.where(np.isnan(v), -np.inf, v)
    ranks = np.argsort(np.argsort(-w, axis=-1, kind="stable"), axis=-1, kind="stable")
    got = np.asarray(jax.jit(jax.vmap(_top_mask_radix, in_axes=(None, 0)))(
        jnp.asarray(v, dtype), jnp.arange(n + 2, dtype=jnp.int32)))
    np.testing.assert_array_equal(got, ranks[None] < np.arange(n + 2)[:, None, None])


def test_outlier_mask_of_a_bf16_operand_equals_its_float32_selection():
    """Block maxima of a bf16 operand stay bf16 (exact), so the selection equals the float32 one (rows of 288 blocks: radix)."""
    t = outlier_split(0.1, granularity="block")
    x = (jax.random.normal(jax.random.key(0), (6, 4608)) * 2).astype(jnp.bfloat16)
    got = outlier_mask(t.meta, x, t.init({}))
    want = outlier_mask(t.meta, x.astype(jnp.float32), t.init({}))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(got.sum()) == 29 * 16 * 6  # round(0.1 · 288) blocks of 16 per row
