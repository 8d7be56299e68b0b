"""Fake-quant attention for Hopper in Mosaic GPU: bf16 WGMMAs on cast q / k / v, the probabilities cast in registers.

Computes :func:`jdq.kernels.quant_attention.ref.reference` for operands in the kernel's layout:
``q`` (B·H, Lq, Dp), ``k`` and ``v`` (B·H, Lk, Dp), bf16, heads first, the head dim zero-padded to
``Dp`` (a multiple of 16, the bf16 WGMMA's K step); for a pair cast (:attr:`ProbCast.pairs`) the
keys of every ``block_kv`` chunk of k and v stored even keys first, then odd keys
(:func:`~jdq.kernels.quant_attention.ref.key_order`). Grid (B·H, Lq / block_q), one warpgroup per CTA:

* the CTA's (block_q, Dp) query tile is brought to shared memory once by TMA;
* **pass 1** (``emit_pipeline`` over the key chunks, k only): S = q·kᵀ (one WGMMA, float32
  accumulator), rounded to bf16 and scaled as the reference's logits; running row max and row sum
  of ``exp(logits − max)`` (float32, rescaled when the max grows);
* **pass 2** (k and v): S again (with ``Config.keep_logits``, pass 1's bf16 scores read back from shared
  memory instead, and only v streamed); ``p = exp(logits − max) / sum`` rounded to bf16; the cast along the
  keys in registers — for an MX / SMX cast every scale block of a chunk is a group of columns of
  the S tile, its max |p| a masked row reduction; for a per-row FP8 cast the row's max probability
  is known from pass 1 (``bf16(1 / sum)``, its max logit's); the element arithmetic is
  :mod:`jdq.formats`' own (``mx`` / ``smx`` / ``fp8.fake_quantize_given_amax``), so a
  probability's cast is bit for bit the reference's; a pair cast computes S as two half-chunk tiles (even keys, odd
  keys), so each element's pair partner sits at the same place of the other tile; the cast
  probabilities go through a swizzled shared tile (one per half) into ``P·V`` WGMMAs (B operand:
  the (keys, Dp) v tile as stored) accumulating into float32;
* epilogue: the accumulator to bf16 (NaN rows where the row's logits had a NaN or an infinity, as
  the reference's softmax gives), staged in shared memory, TMA-stored to the (B·H, Lq, Dp) output.

Lq must be a multiple of ``block_q``, Lk of ``block_kv``, and ``block_kv`` a multiple of the cast's
block (of 32 for a pair cast, whose half-chunks feed a K = 16 WGMMA at least).

Interpret mode (``interpret=True``; see :mod:`jdq.kernels._mgpu`): k is passed as kᵀ (B·H, Dp, Lk),
the accumulation of P·V runs as a fresh accumulator plus an add (the interpreter has no
``pl.run_state``); everything else is the code that runs on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jdq.kernels._mgpu import (group_row_max, interpret_params, kmajor_spec, pl, plgpu, rows_of, smem_transforms,
                               wgmma_partial, wgmma_partials, zeros_carry)
from jdq.kernels.quant_attention.ref import ProbCast

D_MULTIPLE = 16  # bf16 WGMMA K step
SPLIT_MAX_KEYS = 256  # a split's first pass holds a row's logits in one (64, Lk) tile (the WGMMA's largest N)
K_COLS = 8  # a split's k is handed in as a (64, 8) int32 tile (the narrowest of 32-bit values)
KEEP_MAX_BYTES = 64 * 1024  # ``keep_logits``: a row block's bf16 logits held in shared memory (Lk <= 512)


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of the fake-quant attention kernel: ``block_q`` query rows per CTA, ``block_kv`` keys per step, ``stages``.

    ``split_tiles`` (a split's pass 1): the logits as 16-key WGMMA tiles, each block's max from an
    8-column reduction, instead of one (64, Lk) tile with a masked reduction per block (measured
    faster on an H200: ``tuning.QUANT_ATTENTION_SPLIT`` takes it).

    ``keep_logits``: pass 1 stores every chunk's bf16 logits (``bf16(q·kᵀ)``, before the scale) in
    shared memory and pass 2 reads them back instead of recomputing q·kᵀ, so pass 2 streams only v.
    The row block's logits must fit :data:`KEEP_MAX_BYTES` (Lk ≤ 512); pass 1 computes them in pass 2's
    tiles (a pair cast: one tile per half-chunk), and a split needs ``split_tiles`` with 32-key steps.

    ``batch_wgmma``: where a step computes several logit tiles (a pair cast's half-chunks, a split's
    16-key tiles), all their WGMMAs are issued before one wait, rather than each waited for in turn.

    ``sort_ranks`` (a split): the row's key blocks ranked by a sorting network of integer keys
    (:func:`_split_bits_sorted`) instead of counting, for every block, the blocks above it; the same bits.

    ``split_stream`` (a split, with ``split_tiles``): pass 1 streams k in ``block_kv`` chunks like the other
    casts (pipelined loads, 2 · block_kv · Dp · 2 bytes of shared memory instead of the row's whole
    Lk · Dp · 2), a running max and sum, and each chunk's block maxima kept in the carry.
    """

    block_q: int = 64
    block_kv: int = 64
    stages: int = 2
    split_tiles: bool = False
    keep_logits: bool = False
    batch_wgmma: bool = False
    sort_ranks: bool = False
    split_stream: bool = False

    def supports(self, lq: int, lk: int, dp: int, prob: ProbCast) -> str | None:
        """``None`` when (Lq, Lk, Dp) and the cast tile by this config, else why not."""
        if self.block_q != 64:
            return f"block_q={self.block_q}: the kernel runs one 64-row warpgroup tile"
        if lq % self.block_q or lk % self.block_kv:
            return f"Lq={lq} / Lk={lk} are not multiples of block_q={self.block_q} / block_kv={self.block_kv}"
        if dp % D_MULTIPLE or dp > 256:
            return f"head dim {dp} is not a multiple of {D_MULTIPLE} up to 256"
        if self.block_kv % max(prob.block, 1) or self.block_kv > 128:
            return f"block_kv={self.block_kv} is not a multiple of the cast's block {prob.block} (at most 128)"
        if prob.pairs and self.block_kv % 32:
            return f"block_kv={self.block_kv}: a pair cast needs a multiple of 32"
        if prob.kind == "split" and lk > SPLIT_MAX_KEYS:
            return f"Lk={lk}: the split ranks a row's key blocks from one tile of at most {SPLIT_MAX_KEYS} keys"
        if self.keep_logits:
            if self.block_q * lk * 2 > KEEP_MAX_BYTES:
                return f"keep_logits: Lk={lk} keys of bf16 logits per {self.block_q} rows exceed {KEEP_MAX_BYTES} bytes"
            if prob.kind == "split" and not (self.split_tiles and self.block_kv == 32):
                return "keep_logits: a split keeps its 16-key pass-1 tiles, so it needs split_tiles and block_kv=32"
        if self.split_stream and prob.kind == "split" and not self.split_tiles:
            return "split_stream: a streamed split pass 1 computes 16-key tiles, so it needs split_tiles"
        return None


def _row_vec(x, interpret):
    """A (rows,) float32 vector in the layout of a WGMMA tile's row reductions."""
    return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def _scaled(s, scale):
    """The reference's logits from the bf16 scores ``s``: ``float32(s) · scale``."""
    return s.astype(jnp.float32) * jnp.float32(scale)


def _logits(q_s, k_refs, width, scale, interpret, keeps=None, batch=False):
    """``[float32(bf16(q · kᵀ)) · scale]`` for (width, Dp) key tiles ``k_refs`` (interpret: (Dp, width)).

    ``keeps``: SMEM refs each tile's bf16 scores (before the scale) are stored to; ``batch``: all
    tiles' WGMMAs issued before one wait (else one WGMMA and its wait per tile).
    """
    shape = (q_s.shape[0], width)
    if batch:
        scores = wgmma_partials(q_s, k_refs, shape, jnp.float32, interpret)
    else:
        scores = [wgmma_partial(q_s, k, shape, jnp.float32, interpret) for k in k_refs]
    out = []
    for i, s in enumerate(scores):
        s = s.astype(jnp.bfloat16)
        if keeps is not None:
            keeps[i][...] = s
        out.append(_scaled(s, scale))
    return out


def _key_half(k_s, i, w, interpret):
    """Keys ``[i·w, (i+1)·w)`` of the chunk's key tile."""
    return k_s.at[:, pl.ds(i * w, w)] if interpret else k_s.at[pl.ds(i * w, w)]


def _block_amax(p, group_w: int, interpret):
    """Each element's scale-block max |p| as int32 bits; a block is ``group_w`` consecutive columns (p ≥ 0)."""
    return lax.bitcast_convert_type(group_row_max(p, group_w, interpret), jnp.int32)


def cast_probs(halves, prob: ProbCast, interpret=None, row_amax=None, widths=None):
    """The probability tiles ``halves`` (float32, bf16-valued, ≥ 0) cast by ``prob`` along the columns.

    One tile: consecutive columns of ``prob.block`` share a scale, or (``"row"``) each row shares
    one from its max ``row_amax`` (rows,). Two tiles (a pair cast): the even and odd keys of a
    chunk, so a scale block is ``block / 2`` consecutive columns of each and an element's pair
    partner is the other tile's element at the same place. ``widths`` (a split): each element's
    mantissa width (int32, the tiles' shape), the same for both tiles.
    """
    from jdq.formats import fp8, mx, smx

    if prob.kind == "none":
        return halves
    if prob.kind == "row":
        (p,) = halves
        return (fp8.fake_quantize_given_amax(p, rows_of(row_amax, p.shape), prob.spec),)
    if prob.kind == "mx":
        (p,) = halves
        return (mx.fake_quantize_given_amax(p, _block_amax(p, prob.block, interpret), prob.spec),)
    even, odd = halves
    amax = _block_amax(jnp.maximum(even, odd), prob.block // 2, interpret)
    return (smx.fake_quantize_given_amax(even, odd, amax, prob.spec, widths),
            smx.fake_quantize_given_amax(odd, even, amax, prob.spec, widths))


def _column_iota(shape, interpret):
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, 1)
    return plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)


def _key_block(col, bkv):
    """The 16-key block of column ``col`` (an int or an int32 array) of keys stored in ``key_order`` (chunks of ``bkv``).

    Column ``c`` holds key ``(c // bkv)·bkv + 2·(c mod bkv/2) + [c mod bkv ≥ bkv/2]``, so its block is
    ``(c // bkv)·(bkv / 16) + (c mod bkv/2) // 8``.
    """
    return (col // bkv) * (bkv // 16) + (col % (bkv // 2)) // 8


def _split_block_maxima(x, bkv, interpret):
    """Each key block's (16 keys) max logit of a (rows, Lk) tile in ``key_order``: a list of (rows,) vectors, one per block."""
    blk = _key_block(_column_iota(x.shape, interpret), bkv)
    low = jnp.full(x.shape, -jnp.inf, jnp.float32)
    return [jnp.where(blk == b, x, low).max(axis=1) for b in range(x.shape[1] // 16)]


def _tile_block_maxima(tiles, bkv, interpret):
    """The max logit of each 16-key block the consecutive 16-key tiles ``tiles`` (from a chunk's start) hold, in block order.

    In ``key_order`` tile ``c``'s first 8 columns belong to block ``_key_block(16 c)``, the next 8 to the
    following one; the other half of the chunk holds those blocks' other keys.
    """
    col = _column_iota(tiles[0].shape, interpret)
    low = jnp.full(tiles[0].shape, -jnp.inf, jnp.float32)
    maxima = [None] * len(tiles)
    for c, x in enumerate(tiles):
        first = _key_block(c * 16, bkv)
        for i in range(2):
            part = jnp.where(col // 8 == i, x, low).max(axis=1)
            b = first + i
            maxima[b] = part if maxima[b] is None else jnp.maximum(maxima[b], part)
    return maxima


def _split_stats_step(q_s, k_s, j, carry, bkv, scale, interpret, keep=None, batch=False):
    """A streamed split pass 1 at chunk ``j`` (``bkv`` keys as 16-key tiles): the carry's running ``(m, l)`` updated and
    the chunk's blocks' maxima written into its slots of the carry's per-block maxima.

    ``keep`` ((Lk / 16, rows, 16) SMEM): the chunk's tile ``c`` stored to ``keep[j · bkv / 16 + c]``.
    """
    per_chunk = bkv // 16
    tiles = _logits(q_s, [_key_half(k_s, c, 16, interpret) for c in range(per_chunk)], 16, scale, interpret,
                    None if keep is None else [keep.at[j * per_chunk + c] for c in range(per_chunk)], batch)
    local = _tile_block_maxima(tiles, bkv, interpret)
    m, l, *maxima = carry
    m_new = m
    for v in local:
        m_new = jnp.maximum(m_new, v)
    l = l * jnp.exp(m - m_new)
    for x in tiles:
        l = l + jnp.exp(x - rows_of(m_new, x.shape)).sum(axis=1)
    maxima = [jnp.where(j == b // per_chunk, local[b % per_chunk], v) for b, v in enumerate(maxima)]
    return (m_new, l, *maxima)


def _split_stats_tiled(q_s, k_s, lk, bkv, scale, interpret, keep=None, batch=False):
    """A split's pass 1 over a row block's whole key tile as 16-key WGMMA tiles: ``(m, l, *block maxima)``.

    In ``key_order`` a 16-key tile lies in one half of a chunk of ``bkv`` keys: its first 8 columns
    belong to one 16-key block, the next 8 to the following one (the other half holds the blocks'
    other keys). So each block's max is two 8-column reductions, and no reduction spans the whole row.
    ``keep`` ((Lk / 16, rows, 16) SMEM): tile ``c``'s bf16 scores are stored to ``keep[c]``.
    """
    n = lk // 16
    tiles = _logits(q_s, [_key_half(k_s, c, 16, interpret) for c in range(n)], 16, scale, interpret,
                    None if keep is None else [keep.at[c] for c in range(n)], batch)
    maxima = _tile_block_maxima(tiles, bkv, interpret)
    m = maxima[0]
    for v in maxima[1:]:
        m = jnp.maximum(m, v)
    l = None
    for x in tiles:
        part = jnp.exp(x - rows_of(m, x.shape)).sum(axis=1)
        l = part if l is None else l + part
    return (m, l, *maxima)


def _split_bits(block_max, m, l, k_rows):
    """(rows,) int32: bit ``b`` set where key block ``b`` is among the row's ``k`` largest by max probability.

    A block's max probability is its max logit's (the probability is monotone in the logit), rounded
    as every probability; ties go to the earlier block, as :func:`jdq.quant.outliers.top_mask` has them.
    """
    p = [(jnp.exp(x - m) / l).astype(jnp.bfloat16).astype(jnp.float32) for x in block_max]
    one, zero = jnp.ones_like(m), jnp.zeros_like(m)
    bits = jnp.zeros(m.shape, jnp.int32)
    for b, pb in enumerate(p):
        rank = zero
        for c, pc in enumerate(p):
            if c != b:
                rank = rank + jnp.where(pc >= pb if c < b else pc > pb, one, zero)
        bits = bits | jnp.where(rank < k_rows, jnp.full(m.shape, 1 << b, jnp.int32), jnp.zeros(m.shape, jnp.int32))
    return bits


def merge_sort_pairs(n: int) -> list[tuple[int, int]]:
    """The comparators ``(i, j)``, ``i < j``, of Batcher's odd–even merge sort of ``n`` (a power of two) values."""
    pairs, p = [], 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def _split_bits_sorted(block_max, m, l, k_rows):
    """:func:`_split_bits` by a sorting network: the same bits from far fewer comparisons for 16 blocks.

    Each block's key is its rounded max probability's bf16 bits (≥ 0, so integer order is value order)
    above its reversed position, so keys are distinct and ties go to the earlier block; the keys are
    sorted descending (Batcher's network, 63 comparators for 16), the row's threshold is its ``k``-th
    key, and a block is selected where its key reaches it.
    """
    n = len(block_max)
    pos_bits = max(1, (n - 1).bit_length())
    i32 = jnp.int32
    keys = []
    for b, x in enumerate(block_max):
        pb = (jnp.exp(x - m) / l).astype(jnp.bfloat16).astype(jnp.float32)
        keys.append(((lax.bitcast_convert_type(pb, i32) >> 16) << pos_bits) | (n - 1 - b))
    size = 1 << (n - 1).bit_length()
    vals = keys + [jnp.full(m.shape, -1, i32)] * (size - n)
    for a, b in merge_sort_pairs(size):
        vals[a], vals[b] = jnp.maximum(vals[a], vals[b]), jnp.minimum(vals[a], vals[b])
    k = k_rows.astype(i32)
    t = jnp.full(m.shape, jnp.iinfo(i32).max, i32)  # k <= 0: above every key, nothing selected
    for r in range(n):
        t = jnp.where(k == r + 1, vals[r], t)
    t = jnp.where(k > n, jnp.full(m.shape, -1, i32), t)
    bits = jnp.zeros(m.shape, i32)
    for b, key in enumerate(keys):
        bits = bits | jnp.where(key >= t, jnp.full(m.shape, 1 << b, i32), jnp.zeros(m.shape, i32))
    return bits


def _split_widths(bits, j, bkv, shape, prob, interpret):
    """Each element's mantissa width in chunk ``j``'s half tiles (``shape``): ``hi``'s for selected blocks, else ``lo``'s."""
    per_chunk = bkv // 16
    g = _column_iota(shape, interpret) // 8  # the chunk's block of each half-tile column
    hi_m, lo_m = prob.split.hi.mantissa_bits, prob.split.lo.mantissa_bits
    widths = None
    for i in range(per_chunk):
        chosen = (bits >> (j * per_chunk + i)) & 1
        w = rows_of(jnp.where(chosen == 1, jnp.full(bits.shape, hi_m, jnp.int32), jnp.full(bits.shape, lo_m, jnp.int32)),
                    shape)
        widths = w if widths is None else jnp.where(g == i, w, widths)
    return widths


def _pv_into(acc, p_refs, v_refs, interpret):
    """``acc + Σ p_ref · v_ref`` by WGMMAs (B: the (keys, Dp) v tile as stored)."""
    if interpret:  # the GPU interpreter has no run_state: a fresh accumulator, then the add
        def fresh(acc_ref):
            for p_r, v_r in zip(p_refs, v_refs):
                plgpu.wgmma(acc_ref, p_r, v_r)
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))

    def scope(acc_ref):
        for p_r, v_r in zip(p_refs, v_refs):
            plgpu.wgmma(acc_ref, p_r, v_r)
        plgpu.wgmma_wait(0)

    return pl.run_state(scope)(plgpu.ACC.init(acc))


def _kernel(q, k_op, v, scale, prob, cfg, interpret, k_tile=None):
    bh, lq, dp = q.shape
    lk = v.shape[1]
    bq, bkv = cfg.block_q, cfg.block_kv
    halves = 2 if prob.pairs else 1
    split = prob.kind == "split"
    w = bkv // halves
    bf16 = jnp.bfloat16
    d_tr = smem_transforms(dp, bf16, interpret)
    p_tr = d_tr  # P·V wants P's swizzle equal to v's (chosen by Dp); w is a multiple of 16, so it tiles
    steps = lk // bkv
    k_spec = functools.partial(kmajor_spec, bkv, dp, lambda j: (j, 0), d_tr, interpret)
    v_spec = plgpu.BlockSpec((bkv, dp), lambda j: (j, 0), transforms=d_tr)
    # a split ranks a row's key blocks after pass 1: that pass sees all of a row's logits in one tile, unless streamed
    stream = split and cfg.split_stream
    block1, steps1 = (lk, 1) if split and not stream else (bkv, steps)
    k_spec1 = functools.partial(kmajor_spec, block1, dp, lambda j: (j, 0), d_tr, interpret)
    keep = cfg.keep_logits

    def _halves(k_s):
        """A chunk's key tiles as pass 2 computes them: one per half-chunk for a pair cast, else the chunk."""
        return [_key_half(k_s, i, w, interpret) for i in range(halves)] if halves > 1 else [k_s]

    def body(*refs):
        refs = list(refs)
        lg_s = refs.pop(-2) if keep else None  # (Lk / w, bq, w): pass 1's scores in pass 2's tiles
        if split:
            q_g, k_g, v_g, ks_g, o_g, q_s, p_s, o_s, ks_s, bar = refs
        else:
            q_g, k_g, v_g, o_g, q_s, p_s, o_s, bar = refs
        h = lax.axis_index("bh")
        qi = lax.axis_index("q")
        plgpu.copy_gmem_to_smem(q_g.at[h, pl.ds(qi * bq, bq)], q_s, bar.at[0])
        if split:
            plgpu.copy_gmem_to_smem(ks_g, ks_s, bar.at[1])

        def stats(idx, k_s, carry):
            (j,) = idx
            pl.when(j == 0)(lambda: plgpu.barrier_wait(bar.at[0]))
            m, l = carry[:2]
            if stream:
                return _split_stats_step(q_s, k_s, j, carry, bkv, scale, interpret, lg_s, cfg.batch_wgmma)
            if split and cfg.split_tiles:
                return _split_stats_tiled(q_s, k_s, lk, bkv, scale, interpret, lg_s, cfg.batch_wgmma)
            if keep:  # pass 2's tiles: one per half-chunk, each stored
                xs = _logits(q_s, _halves(k_s), w, scale, interpret, [lg_s.at[j * halves + i] for i in range(halves)],
                             cfg.batch_wgmma)
            else:
                xs = _logits(q_s, [k_s], block1, scale, interpret)
            m_new = m
            for x in xs:
                m_new = jnp.maximum(m_new, x.max(axis=1))
            l = l * jnp.exp(m - m_new)
            for x in xs:
                l = l + jnp.exp(x - rows_of(m_new, x.shape)).sum(axis=1)
            if split:  # one step: the carry's block maxima are this tile's
                return (m_new, l, *_split_block_maxima(xs[0], bkv, interpret))
            return m_new, l

        m0 = _row_vec(jnp.full((bq,), -jnp.inf, jnp.float32), interpret)
        l0 = _row_vec(jnp.zeros((bq,), jnp.float32), interpret)
        init = (m0, l0) + ((m0,) * (lk // 16) if split else ())
        carry = plgpu.emit_pipeline(stats, grid=(steps1,), in_specs=[k_spec1()], max_concurrent_steps=min(cfg.stages, steps1),
                                    init_carry=init)(k_g.at[h])
        m, l = carry[:2]

        # a row's largest probability is its max logit's, exp(0) / sum = 1 / sum, rounded to bf16 like every p
        row_amax = (1.0 / l).astype(bf16).astype(jnp.float32) if prob.kind == "row" else None
        bits = None
        if split:
            plgpu.barrier_wait(bar.at[1])
            ks = ks_s[...] if interpret else plgpu.load(ks_s, (), layout=plgpu.Layout.WGMMA)
            rank = _split_bits_sorted if cfg.sort_ranks else _split_bits
            bits = rank(carry[2:], m, l, ks.astype(jnp.float32).max(axis=1))

        def attend(idx, *refs):
            (j,) = idx
            *k_s, v_s, acc = refs
            if keep:
                tiles = [lg_s.at[j * halves + i] for i in range(halves)]
                xs = [_scaled(t[...] if interpret else plgpu.load(t, (), layout=plgpu.Layout.WGMMA), scale) for t in tiles]
            else:
                xs = _logits(q_s, _halves(k_s[0]), w, scale, interpret, batch=cfg.batch_wgmma)
            ps = []
            for x in xs:
                p = jnp.exp(x - rows_of(m, x.shape)) / rows_of(l, x.shape)
                ps.append(p.astype(bf16).astype(jnp.float32))
            widths = _split_widths(bits, j, bkv, ps[0].shape, prob, interpret) if split else None
            for i, p in enumerate(cast_probs(tuple(ps), prob, interpret, row_amax, widths)):
                p_s.at[i][...] = p.astype(bf16)
            plgpu.commit_smem()
            return _pv_into(acc, [p_s.at[i] for i in range(halves)],
                            [v_s.at[pl.ds(i * w, w)] for i in range(halves)], interpret)

        acc = plgpu.emit_pipeline(attend, grid=(steps,), in_specs=([] if keep else [k_spec()]) + [v_spec],
                                  max_concurrent_steps=min(cfg.stages, steps),
                                  init_carry=zeros_carry((bq, dp), interpret))(*([] if keep else [k_g.at[h]]), v_g.at[h])
        bad = rows_of(l, acc.shape)
        acc = jnp.where(bad != bad, jnp.nan, acc)  # NaN sum: a NaN or an infinite logit in the row
        o_s[...] = acc.astype(o_s.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_g.at[h, pl.ds(qi * bq, bq)])
        plgpu.wait_smem_to_gmem(0)

    scratch = [plgpu.SMEM((bq, dp), bf16, transforms=d_tr), plgpu.SMEM((halves, bq, w), bf16, transforms=p_tr),
               plgpu.SMEM((bq, dp), bf16, transforms=d_tr)]
    if split:
        scratch.append(plgpu.SMEM((bq, K_COLS), jnp.int32))
    if keep:
        scratch.append(plgpu.SMEM((lk // w, bq, w), bf16, transforms=smem_transforms(w, bf16, interpret)))
    scratch.append(plgpu.Barrier(num_arrivals=1, num_barriers=2 if split else 1))
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((bh, lq, dp), bf16),
        grid=(bh, lq // bq),
        grid_names=("bh", "q"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret_params(interpret),
    )(q, k_op, v, *(() if k_tile is None else (k_tile,)))


@functools.partial(jax.jit, static_argnames=("scale", "prob", "config", "interpret"))
def quant_attention_gpu(q, k, v, *, scale: float, prob: ProbCast, config: Config = Config(), interpret: bool = False,
                        ratio=None):
    """The kernel on ``q`` (B·H, Lq, Dp), ``k`` / ``v`` (B·H, Lk, Dp) bf16 in the kernel's key order: (B·H, Lq, Dp) bf16.

    ``ratio``: a split's state (float32), the share of each row's key blocks cast in ``hi``.
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 3 or a.dtype != jnp.bfloat16:
            raise ValueError(f"quant_attention_gpu: {name} must be (B·H, L, Dp) bfloat16, got {a.shape} {a.dtype}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"quant_attention_gpu: q {q.shape}, k {k.shape}, v {v.shape} do not fit together")
    why = config.supports(q.shape[1], k.shape[1], q.shape[2], prob)
    if why:
        raise ValueError(f"quant_attention_gpu: {why}")
    k_tile = None
    if prob.kind == "split":
        from jdq.quant.outliers import outlier_count

        if ratio is None:
            raise ValueError("quant_attention_gpu: a split needs its ratio")
        n_blocks = -(-k.shape[1] // prob.split.block_size)
        k_tile = jnp.full((config.block_q, K_COLS), outlier_count(ratio, n_blocks), jnp.int32)
    k_op = jnp.swapaxes(k, 1, 2) if interpret else k  # interpret: kᵀ (the B operand as (K, N))
    return _kernel(q, k_op, v, scale, prob, config, interpret, k_tile)


__all__ = ["Config", "D_MULTIPLE", "cast_probs", "quant_attention_gpu"]
