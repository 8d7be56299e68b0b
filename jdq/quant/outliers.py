"""Magnitude outlier split (MixDiT): the top-r fraction by magnitude in a high-precision format.

MixDiT quantizes activations in mixed MX formats: magnitude outliers in MX9, the rest in MX6
(docs/methods.md §2; the paper body, and so its exact selection rule, was not available). An
:func:`outlier_split` keeps a fraction ``r`` of the operand, chosen by magnitude, in format
``hi`` and the rest in ``lo``. It is emulated as two casts that a mixed-precision GEMM would
compute as two partial products::

    out = where(mask, cast_hi(where(mask, x, 0)), cast_lo(where(mask, 0, x)))

so ``lo``'s block scales are computed without the outliers (that is the point of the split) and
``hi``'s from the outliers alone. Where every block of both formats lies inside one selection unit
(block granularity with a selection block that is a multiple of the formats' blocks, or the
channel prefix of a multiple of their blocks: the default MX9 / MX6 splits), a block is all
outliers or none, so zeroing the other part changes no scale and the two masked casts equal
``where(mask, cast_hi(x), cast_lo(x))``; that form runs (``jdq.formats.cast_select``: one pass
with a per-element mantissa width for two SMX formats), the same values bit for bit. Granularity
of the selection (``granularity=``):

* ``"element"`` (dynamic): the ``k = round(r·n)`` largest ``|x|`` of each row of ``n`` elements
  along the contraction axis (``scope="row"``, default: each token independent of the rest of
  the batch) or of the whole operand (``scope="tensor"``);
* ``"block"`` (dynamic, default): the ``k = round(r·n_blocks)`` blocks of ``block_size``
  (default 16, the MX9/MX6 block) consecutive elements along the contraction axis with the
  largest max ``|x|``, per row or per tensor (a short last block is zero-padded, as the formats do);
* ``"channel"`` (static): the input channels (contraction indices) with the largest calibrated
  ``absmax_channel`` (max over steps), ``k`` = ``r·C`` rounded to the nearest multiple of
  ``channel_multiple`` (default: the larger block size of ``hi`` and ``lo``, so both parts are
  whole blocks). The operand is emulated in the order a kernel would use, outlier channels first
  (each part in its original channel order, :func:`channel_permutation`), cast in that order and
  permuted back. A kernel that reorders the activation's channels must reorder the weight's input
  channels the same way; :func:`outlier_weight` quantizes the weight in that order too, so the
  fake-quant path matches such a kernel exactly.

Ties in magnitude are broken by position (stable sort), so exactly ``k`` units are selected.
The ratio ``r`` is **state** (a float32 array ``state["ratio"]``), not a static option, so a
stack of states with different ratios runs under one ``jax.vmap`` in one compiled call; the
constructor's ``ratio`` is only the default ``init`` uses (:func:`set_outlier_ratio` rewrites it
in a whole plan state). :func:`outlier_mask` / :func:`outlier_fraction` report the realised
selection for an input and a state (pure, jit/vmap-able).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp
from jax import lax

from jdq.quant.casts import along_axis, resolve_format
from jdq.quant.transform import Plan, QuantTransform, WrapsInner, identity, map_stages

GRANULARITIES = ("element", "block", "channel")
SCOPES = ("row", "tensor")


@dataclasses.dataclass(frozen=True)
class OutlierMeta:
    """``meta`` of an outlier split: the two format specs and how outliers are selected."""

    kind: ClassVar[str] = "outlier_split"
    hi: Any  # hashable spec of the high-precision format
    lo: Any  # hashable spec of the low-precision format
    granularity: str
    block_size: int
    scope: str
    channel_multiple: int


@dataclasses.dataclass(frozen=True)
class OutlierWeightMeta(WrapsInner):
    """``meta`` of :func:`outlier_weight`: the channel multiple and the wrapped weight transform."""

    kind: ClassVar[str] = "outlier_weight"
    channel_multiple: int
    inner: Any


def _check_ratio(ratio, who):
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"{who}: ratio must lie in [0, 1], got {ratio!r}")
    return float(ratio)


def outlier_count(ratio, n, multiple=1):
    """``round(ratio·n)`` to the nearest multiple of ``multiple`` (half up), clipped to ``[0, n]``."""
    k = jnp.floor(jnp.asarray(ratio, jnp.float32) * (n / multiple) + 0.5).astype(jnp.int32) * multiple
    return jnp.clip(k, 0, n)


#: Rows of up to ``_UNROLLED_RANK_ANY`` entries: the top-k mask counts ranks with one elementwise
#: term per entry (``_top_mask_unrolled``) on every backend; up to ``_UNROLLED_RANK_MAX`` on a CPU
#: only; longer rows sort. Measured (benchmarks/mixdit_fakequant.py, RESULTS §3 "Ninth round"): on
#: an H200 the count is 2.1-3.8x faster than the sort for rows of 5-16 block maxima (the attention
#: operands), 1.6x for 72 but 3.9x slower for 288; every unrolled term is compiled, and with 72 the
#: DiT-XL/2 MixDiT step compiled in 151 s instead of 38 s. On a CPU it is 8-150x faster for rows
#: of 5-288, and rows of 72 compile in about 1.7x the sort's time.
_UNROLLED_RANK_ANY = 16
_UNROLLED_RANK_MAX = 72


def _unrolled_ranks(v):
    """:func:`_ranks` by the pairwise count written as ``n`` elementwise terms (one fused loop, no reduce).

    Each entry compares itself with every entry of its row, read as a static slice, so XLA fuses
    the ``n`` terms into one elementwise pass (a reduce over an ``(n, n)`` comparison per row
    materialises it: on an H200 24x slower for rows of 72). The work per entry grows with ``n``.
    """
    n = v.shape[-1]
    w = jnp.where(jnp.isnan(v), -jnp.inf, v)  # v are magnitudes (>= 0): NaN ranks after every number
    pos = lax.broadcasted_iota(jnp.int32, w.shape, w.ndim - 1)
    rank = jnp.zeros(w.shape, jnp.int32)
    for j in range(n):
        other = lax.slice_in_dim(w, j, j + 1, axis=-1)
        rank = rank + ((other > w) | ((other == w) & (j < pos))).astype(jnp.int32)
    return rank


def _ranks(v):
    """Rank of each entry of the last axis by decreasing value (0 = largest; ties by position; NaN last)."""
    if v.shape[-1] <= _UNROLLED_RANK_ANY:
        return _unrolled_ranks(v)
    order = jnp.argsort(-v, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def _top_mask_sorted(v, k):
    """``_ranks(v) < k`` from one stable sort: everything above the ``k``-th largest, and the ties up to its position.

    ``v``: magnitudes (``>= 0`` or NaN). One sort per row instead of an O(n²) comparison count:
    for rows too long to count elementwise.
    """
    n = v.shape[-1]
    w = jnp.where(jnp.isnan(v), -jnp.inf, v)  # as in _ranks: NaN ranks after every number
    k = jnp.asarray(k, jnp.int32)
    order = jnp.argsort(-w, axis=-1, stable=True)  # decreasing, ties by position
    at = jnp.broadcast_to(jnp.clip(k - 1, 0, n - 1), w.shape[:-1] + (1,)).astype(jnp.int32)
    last = jnp.take_along_axis(order, at, axis=-1)  # position of the k-th largest
    thr = jnp.take_along_axis(w, last, axis=-1)
    pos = lax.broadcasted_iota(jnp.int32, w.shape, w.ndim - 1)
    return ((w > thr) | ((w == thr) & (pos <= last))) & (k > 0)


def _top_mask_unrolled(v, k):
    """``_ranks(v) < k`` from the elementwise rank count (:func:`_unrolled_ranks`), for short rows."""
    return _unrolled_ranks(v) < k


#: Bits of the threshold found per pass of :func:`_top_mask_radix` (``2**bits - 1`` candidate counts
#: per row and pass): fewer passes over the row's keys against more comparisons per entry.
RADIX_DIGIT_BITS = 4


def order_key(v):
    """Unsigned integers in the order of ``v``'s values (a float dtype of 16 or 32 bits), NaN as ``-inf``, ``-0`` as ``+0``.

    The order (and the ties) of :func:`_ranks`' comparisons, as integers a radix select can bisect.
    """
    bits = jnp.finfo(v.dtype).bits
    if bits not in (16, 32):
        raise ValueError(f"order_key: values of {bits}-bit floats are not supported (dtype {v.dtype})")
    w = jnp.where(jnp.isnan(v), -jnp.inf, v)
    w = jnp.where(w == 0, jnp.zeros((), v.dtype), w)  # -0 equals +0 in the comparisons
    sint, uint = (jnp.int16, jnp.uint16) if bits == 16 else (jnp.int32, jnp.uint32)
    u = lax.bitcast_convert_type(w, uint)
    negative = lax.bitcast_convert_type(w, sint) < 0
    # positives above negatives (set the sign bit); among negatives a larger magnitude is smaller (flip all bits)
    u = jnp.where(negative, ~u, u | jnp.array(1 << (bits - 1), uint))
    return u.astype(jnp.uint32), bits


def _radix_threshold(key, bits, k, valid=None, digit_bits=RADIX_DIGIT_BITS, candidates_minor=False):
    """Per row, the largest ``t`` with ``count(valid & (key >= t)) >= k`` (``key``: uint32 below ``2**bits``).

    That is the ``k``-th largest key among the valid entries (for ``k >= 1``; 0 when fewer
    qualify). Built most significant digit first, ``digit_bits`` per pass: each pass counts,
    for every digit value, the keys at or above the threshold so far with that digit set, one
    reduction over the row, and keeps the largest digit whose count reaches ``k``. With
    ``candidates_minor`` the counts are a reduction over the middle axis of (..., n, candidates)
    instead of the last of (..., candidates, n): the same numbers, another reduction emitter.
    """
    t = jnp.zeros(key.shape[:-1] + (1,), jnp.uint32)
    hi = bits
    while hi > 0:
        shift = max(hi - digit_bits, 0)
        width, hi = hi - shift, shift
        digits = jnp.arange(1, 1 << width, dtype=jnp.uint32) << shift
        if candidates_minor:
            at_or_above = key[..., :, None] >= (t | digits)[..., None, :]  # (..., n, 2**width - 1)
            if valid is not None:
                at_or_above = at_or_above & valid[..., :, None]
            count = jnp.sum(at_or_above, axis=-2, dtype=jnp.int32)
        else:
            cand = t[..., None, :] | digits[:, None]  # (..., 2**width - 1, 1): every next digit value
            at_or_above = key[..., None, :] >= cand
            if valid is not None:
                at_or_above = at_or_above & valid[..., None, :]
            count = jnp.sum(at_or_above, axis=-1, dtype=jnp.int32)  # (..., 2**width - 1)
        chosen = jnp.sum(count >= k, axis=-1, dtype=jnp.uint32)  # counts fall with the digit: the largest that holds
        t = t | (chosen[..., None] << shift)
    return t


def _top_mask_radix(v, k, digit_bits=RADIX_DIGIT_BITS, candidates_minor=False):
    """``_ranks(v) < k`` by radix selection: the ``k``-th largest value, then the first ties by position.

    No sort: a fixed number of reductions over each row (16-bit values ``⌈16 / d⌉`` passes, 32-bit
    ``⌈32 / d⌉``, then ``⌈log2 n / d⌉`` over the tied entries' positions),
    each counting the row's entries at or above ``2**d - 1`` candidate thresholds (``d = digit_bits``).
    """
    n = v.shape[-1]
    key, bits = order_key(v)
    k = jnp.asarray(k, jnp.int32)[..., None] if jnp.ndim(k) else jnp.asarray(k, jnp.int32)
    t_value = _radix_threshold(key, bits, k, digit_bits=digit_bits, candidates_minor=candidates_minor)
    above = key > t_value
    tied = key == t_value
    need = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)  # ties to take, first by position
    later = jnp.uint32(n - 1) - lax.broadcasted_iota(jnp.uint32, key.shape, key.ndim - 1)  # earlier = larger
    t_pos = _radix_threshold(later, max(int(n - 1).bit_length(), 1), need, valid=tied, digit_bits=digit_bits,
                             candidates_minor=candidates_minor)
    return (above | (tied & (later >= t_pos))) & (k > 0)


def top_mask(v, k):
    """Boolean, shape of ``v``: the ``k`` largest entries of each row of the last axis (ties by position, NaN last).

    The same selection as ``rank < k`` with the ranks of the module (bit-identical on every
    backend): short rows count ranks elementwise; longer rows threshold after one sort, or on a CPU
    select by radix (:func:`_top_mask_radix`, 2x faster than the sort there for rows of 288; on an
    H200 XLA's reductions made it slower than the sort, RESULTS §3 "Twelfth round"; a GPU model's
    linear inputs take ``jdq.kernels.row_select.top_mask`` instead, passed as ``top`` to
    :func:`split_dynamic`). Where the switches lie: ``_UNROLLED_RANK_ANY``, ``_MAX``.
    """
    n = v.shape[-1]
    if n <= _UNROLLED_RANK_ANY:
        return _top_mask_unrolled(v, k)
    if n <= _UNROLLED_RANK_MAX:
        return lax.platform_dependent(v, k, cpu=_top_mask_unrolled, default=_top_mask_sorted)
    return lax.platform_dependent(v, k, cpu=_top_mask_radix, default=_top_mask_sorted)


def channel_ranks(absmax_channel):
    """Rank (int32, 0 = largest) of each channel by calibrated ``absmax_channel`` (``[C]`` or per-step ``[S, C]``)."""
    a = jnp.asarray(absmax_channel, jnp.float32)
    return _ranks(a if a.ndim == 1 else a.max(0)).astype(jnp.int32)


def channel_mask(state, multiple: int):
    """Boolean ``[C]``: the outlier channels of a channel-granularity state (``rank < k``)."""
    rank = state["rank"]
    return rank < outlier_count(state["ratio"], rank.shape[-1], multiple)


def channel_permutation(state, multiple: int):
    """The kernel's channel order: outlier channels first, then the rest, each in original order."""
    return jnp.argsort(~channel_mask(state, multiple), stable=True)


def outlier_mask(meta: OutlierMeta, x, state, axis: int = -1, top=None):
    """Boolean mask, shape of ``x``: the elements that :func:`outlier_split` keeps in ``meta.hi``.

    ``top``: the ``(values, k) -> mask`` selection of each row's ``k`` largest (default
    :func:`top_mask`; any function that selects what it selects, e.g. a kernel's).
    """
    x = jnp.asarray(x)
    axis = axis % x.ndim
    n = x.shape[axis]
    if meta.granularity == "channel":
        rank = state["rank"]
        if rank.shape[-1] != n:
            raise ValueError(f"outlier_mask: state has {rank.shape[-1]} channel ranks for {n} channels (shape {x.shape}, axis {axis})")
        return jnp.broadcast_to(along_axis(channel_mask(state, meta.channel_multiple), x.ndim, axis), x.shape)
    moved = jnp.moveaxis(x, axis, -1)
    # 16-bit floats keep their dtype (their maxima are exact in it): the radix selection then needs half the passes
    keep = moved.dtype in (jnp.bfloat16, jnp.float16)
    mag = jnp.abs(moved if keep else moved.astype(jnp.float32))
    if meta.granularity == "block":
        bs = meta.block_size
        pad = (-n) % bs
        if pad:
            mag = jnp.pad(mag, [(0, 0)] * (mag.ndim - 1) + [(0, pad)])
        mag = mag.reshape(mag.shape[:-1] + ((n + pad) // bs, bs)).max(-1)
    flat = mag.reshape(1, -1) if meta.scope == "tensor" else mag
    chosen = (top or top_mask)(flat, outlier_count(state["ratio"], flat.shape[-1]))
    chosen = chosen.reshape(mag.shape)
    if meta.granularity == "block":
        chosen = jnp.repeat(chosen, meta.block_size, axis=-1)[..., :n]
    return jnp.moveaxis(chosen, -1, axis)


def outlier_fraction(meta: OutlierMeta, x, state, axis: int = -1):
    """The realised outlier fraction (float32 scalar): the share of ``x``'s elements kept in ``meta.hi``."""
    return jnp.mean(outlier_mask(meta, x, state, axis).astype(jnp.float32))


def _blocks_inside_units(meta) -> bool:
    """Whether every block of ``hi`` and of ``lo`` lies inside one selection unit (so the mask is constant on it).

    Units: blocks of ``meta.block_size`` (``granularity="block"``), or, in the kernel's channel
    order, the outlier prefix of a multiple of ``channel_multiple`` channels (``"channel"``).
    """
    unit = {"block": meta.block_size, "channel": meta.channel_multiple}.get(meta.granularity)
    return unit is not None and all(
        getattr(s, "kind", None) in ("mx", "smx") and unit % s.block_size == 0 for s in (meta.hi, meta.lo))


def _split_cast(x, mask, meta, axis):
    from jdq import formats

    if _blocks_inside_units(meta):
        # A block is then all outliers or none, so zeroing the other part changes no block's scale:
        # the two masked casts equal the two casts of x itself, selected (one pass for MX9 / MX6).
        return formats.cast_select(x, mask, meta.hi, meta.lo, axis=axis)
    zero = jnp.zeros((), x.dtype)
    hi = formats.cast(jnp.where(mask, x, zero), meta.hi, axis=axis)
    lo = formats.cast(jnp.where(mask, zero, x), meta.lo, axis=axis)
    return jnp.where(mask, hi, lo)


def split_dynamic(meta: OutlierMeta, x, state, axis: int = -1, top=None):
    """``x`` split-cast by a dynamic (element or block granularity) :func:`outlier_split` with ``state``: its ``apply``.

    ``top`` as in :func:`outlier_mask` (a model passes a kernel's selection here).
    """
    if meta.granularity == "channel":
        raise ValueError("split_dynamic: a channel-granularity split permutes channels; use the transform's apply")
    return _split_cast(x, outlier_mask(meta, x, state, axis, top), meta, axis)


def outlier_split(ratio: float = 0.05, hi="mx9", lo="mx6", granularity: str = "block", *,
                  block_size: int = 16, scope: str = "row", channel_multiple: int | None = None,
                  hi_options: Mapping | None = None, lo_options: Mapping | None = None) -> QuantTransform:
    """MixDiT split: the top-``ratio`` by magnitude cast to ``hi``, the rest to ``lo`` (see module docstring).

    State: ``{"ratio": float32}``, plus ``{"rank": int32 [C]}`` for ``granularity="channel"``
    (from the statistic ``"absmax_channel"``).
    """
    ratio = _check_ratio(ratio, "outlier_split")
    if granularity not in GRANULARITIES:
        raise ValueError(f"outlier_split: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if scope not in SCOPES:
        raise ValueError(f"outlier_split: scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"outlier_split: block_size must be a positive int, got {block_size!r}")
    hi_spec, lo_spec = resolve_format(hi, hi_options), resolve_format(lo, lo_options)
    if channel_multiple is None:
        sizes = [getattr(s, "block_size", None) or 1 for s in (hi_spec, lo_spec)]
        channel_multiple = math.lcm(*sizes)
    if not isinstance(channel_multiple, int) or channel_multiple < 1:
        raise ValueError(f"outlier_split: channel_multiple must be a positive int, got {channel_multiple!r}")
    meta = OutlierMeta(hi_spec, lo_spec, granularity, block_size, scope, channel_multiple)

    def init(stats):
        state = {"ratio": jnp.float32(ratio)}
        if granularity == "channel":
            state["rank"] = channel_ranks(stats["absmax_channel"])
        return state

    def apply(x, state, ctx):
        if granularity != "channel":
            return split_dynamic(meta, x, state, ctx.axis)
        mask = outlier_mask(meta, x, state, ctx.axis)  # also checks the channel count
        perm = channel_permutation(state, channel_multiple)
        xp = jnp.take(x, perm, axis=ctx.axis)
        mp = jnp.take(mask, perm, axis=ctx.axis)
        return jnp.take(_split_cast(xp, mp, meta, ctx.axis), jnp.argsort(perm), axis=ctx.axis)

    return QuantTransform(init, apply, meta)


def outlier_weight(inner: QuantTransform | None = None, ratio: float = 0.05, *, channel_multiple: int = 16) -> QuantTransform:
    """Weight side of a channel-granularity split: ``inner`` applied with input channels in the kernel's order.

    Permutes the weight's contraction axis by :func:`channel_permutation` (from the activation's
    calibrated ranks: statistic ``"act_absmax_channel"``, see :func:`jdq.quant.balance.link_stats`),
    applies ``inner`` (the weight's cast, whose blocks then match the permuted activation's) and
    permutes back. ``ratio`` and ``channel_multiple`` must equal the activation side's.
    State: ``{"ratio", "rank", "inner"}``.
    """
    ratio = _check_ratio(ratio, "outlier_weight")
    inner = identity() if inner is None else inner

    def init(stats):
        return {"ratio": jnp.float32(ratio), "rank": channel_ranks(stats["act_absmax_channel"]),
                "inner": inner.init(stats)}

    def apply(w, state, ctx):
        if state["rank"].shape[-1] != w.shape[ctx.axis]:
            raise ValueError(f"outlier_weight at {ctx.site}:{ctx.role}: {state['rank'].shape[-1]} channel ranks "
                             f"for {w.shape[ctx.axis]} input channels (shape {w.shape}, axis {ctx.axis})")
        perm = channel_permutation(state, channel_multiple)
        wq = inner.apply(jnp.take(w, perm, axis=ctx.axis), state["inner"], ctx)
        return jnp.take(wq, jnp.argsort(perm), axis=ctx.axis)

    return QuantTransform(init, apply, OutlierWeightMeta(channel_multiple, inner.meta))


def set_outlier_ratio(plan: Plan, state: Mapping[str, Any], ratio, keys=None) -> dict[str, Any]:
    """``state`` with the ratio of every outlier stage (of operands ``keys``, default all) set to ``ratio``."""
    r = jnp.asarray(ratio, jnp.float32)

    def setr(meta, st, stacked):
        if isinstance(meta, (OutlierMeta, OutlierWeightMeta)) and st is not None:
            return dict(st, ratio=jnp.broadcast_to(r, jnp.shape(st["ratio"])))
        return st

    out = dict(state)
    for key in plan.quantized_keys if keys is None else keys:
        out[key] = map_stages(plan.transform_for(key).meta, state[key], setr)
    return out
