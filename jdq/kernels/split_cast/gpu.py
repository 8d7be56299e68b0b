"""MixDiT's split cast of a linear input in one Mosaic GPU kernel: :func:`jdq.kernels.split_cast.ref.reference`.

Unfused, XLA reads a MixDiT linear input three times and writes it twice: the block maxima (a
reduction fusion, after the MLP's GELU in another pass), the top-k selection (a sort or
:mod:`jdq.kernels.row_select`), the cast with a width per block (a loop fusion). Here each CTA owns
64 rows and makes three passes over them:

* **keys** (``emit_pipeline`` over column chunks of the row block): each block of 16 elements is an
  (64, 8) slice of int32 words (two bf16 each) loaded in the WGMMA register layout, so its max
  ``|x|`` is one row reduction; the activation (if any) runs operation by operation rounded to bf16
  (:mod:`jdq.kernels.act_cast.ref`) and its result is written to the output, which pass 3 reads
  back; each block's distinct key (:func:`block_key`: the magnitude's order bits, then the reversed
  position, as :func:`jdq.kernels.row_select.ref.unique_keys`) goes to shared memory, one (64, 8)
  or (64, 16) tile per chunk (:func:`key_cols`; unused columns hold -1, which no threshold counts);
* **threshold**: per row the largest ``t`` with ``count(keys >= t) >= k``, bit by bit from the
  keys in shared memory (:mod:`jdq.kernels.row_select.gpu`'s search): the ``k`` selected blocks are
  exactly those with ``key >= t``;
* **cast** (``emit_pipeline`` again, reading the input or the activation written in pass 1): each
  block's max and key again, its mantissa width ``hi``'s where selected, else ``lo``'s, and the
  element arithmetic of :func:`jdq.formats.smx.fake_quantize_given_amax`, so every value is the
  library's bit for bit; the outputs go through a ring of two shared-memory tiles (the GPU
interpreter does not take the pipeline's own output copies).

Measured slower on an H200 than XLA's fusions around ``row_select`` (RESULTS §3 "Thirteenth
round"), so the model takes it only with ``JDQ_SPLIT_CAST=kernel``.

A chunk is a whole number of blocks (at most 16; :data:`CHUNK_WORDS`) whose row pitch is an odd
number of 32-byte sectors, so the blocks' slices load without bank conflicts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jdq.kernels._mgpu import pl, plgpu, row_block_kernel, rows_of
from jdq.kernels.act_cast.gpu import pack_words, unpack_words
from jdq.kernels.act_cast.ref import activation_rounded
from jdq.kernels.split_cast.ref import check

ROWS = 64  # rows per CTA (the WGMMA layout's row tile)
K_COLS = 8  # k is handed in as (M, 8) int32, the narrowest WGMMA-layout tile of 32-bit values
BLOCK = 16  # elements per block (MX9 / MX6): 8 int32 words
BLOCK_WORDS = BLOCK // 2
# Column chunks in int32 words, preferred first: whole blocks, a row pitch of an odd number of 32-byte
# sectors (other pitches give the blocks' (64, 8) loads bank conflicts: no conflict-free load plan).
CHUNK_WORDS = (72, 56, 40, 24, 8)
STAGES = 2
SMEM_BUDGET = 200 * 1024  # bytes of shared memory the keys and the pipelines' buffers may take
MAX_KEY_BITS = 31
NAN_MAGNITUDE = 0x7F80  # bf16 bits of +inf: larger magnitude bits are NaN


def chunk_words(n_words: int) -> int:
    """Int32 words per column chunk for rows of ``n_words`` (a multiple of 8): the first of :data:`CHUNK_WORDS` that divides it."""
    return next(c for c in CHUNK_WORDS if n_words % c == 0)


def key_cols(cw: int) -> int:
    """Columns of a chunk's key tile: its blocks, rounded up to 8 or 16 (a WGMMA-layout tile of 32-bit values)."""
    return 8 if cw // BLOCK_WORDS <= 8 else 16


def smem_bytes(k: int) -> int:
    """Shared memory of the kernel for rows of ``k`` elements: the keys, the input pipeline and the output ring."""
    cw = chunk_words(k // 2)
    return (k // 2 // cw) * ROWS * key_cols(cw) * 4 + 2 * STAGES * ROWS * cw * 4


def key_bits(n_blocks: int) -> tuple[int, int]:
    """``(bits, position_bits)`` of a row's block keys: 16 order bits of the magnitude, then the position."""
    pos_bits = max(int(n_blocks - 1).bit_length(), 1)
    return 16 + pos_bits, pos_bits


def supports(m: int, k: int, block: int) -> str | None:
    """``None`` when (M, K) bf16 rows in blocks of ``block`` tile the kernel, else why not."""
    if m % ROWS:
        return f"{m} rows are not a multiple of {ROWS}"
    if block != BLOCK or k % BLOCK:
        return f"K={k} in blocks of {block}: the kernel takes blocks of {BLOCK} that divide K"
    smem = smem_bytes(k)
    if smem > SMEM_BUDGET:
        return f"K={k}: {smem} bytes of keys and buffers exceed {SMEM_BUDGET}"
    if key_bits(k // block)[0] > MAX_KEY_BITS:
        return f"K={k}: {k // block} blocks' keys exceed {MAX_KEY_BITS} bits"
    return None


def block_key(amax_bits, pos, n_blocks: int, pos_bits: int):
    """Distinct int32 keys in the selection's order: a block's max ``|x|`` (float32 bits of a bf16 value) and its position.

    The magnitude's 16-bit order key (:func:`jdq.quant.outliers.order_key` of a value ≥ 0: the bits
    with the sign bit set; NaN as ``-inf``, below every number), then ``n_blocks - 1 - pos``, so of
    equal magnitudes the earlier block ranks first.
    """
    a16 = amax_bits >> 16
    value = jnp.where(a16 > NAN_MAGNITUDE, jnp.full(a16.shape, 0x7F, jnp.int32), a16 | 0x8000)
    return (value << pos_bits) | (n_blocks - 1 - pos)


def _load(ref, interpret):
    return ref[...] if interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA)


def _wgmma(x, interpret):
    return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)


def _row_vec(x, interpret):
    return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def _column_iota(shape, interpret):
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, 1)
    return plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)


def _block_amax(lo, hi):
    """(rows,) int32: the max ``|x|`` bits of a block's (rows, block/2) words, unpacked to ``lo`` / ``hi``."""
    from jdq.formats import _bits as fbits

    return jnp.maximum(fbits.abs_bits(lo), fbits.abs_bits(hi)).max(axis=1)


@functools.partial(jax.jit, static_argnames=("meta", "activation", "interpret"))
def split_cast_gpu(x, k, meta, activation: str | None = None, interpret=False):
    """The split cast of ``activation(x)`` for bf16 ``x`` (M, K): (M, K) bf16. ``k``: int32 blocks per row in ``hi`` (scalar or (M,))."""
    from jdq.formats import smx

    check(x, meta, activation)
    if x.ndim != 2:
        raise ValueError(f"split_cast kernel: x must be 2-D (M, K), got shape {x.shape}")
    m, kdim = x.shape
    why = supports(m, kdim, meta.block_size)
    if why:
        raise ValueError(f"split_cast kernel: {why}")
    n_words, bw = kdim // 2, BLOCK_WORDS
    cw = chunk_words(n_words)
    kb, n_chunks, n_blocks, kc = cw // bw, n_words // cw, kdim // BLOCK, key_cols(cw)
    bits, pos_bits = key_bits(n_blocks)
    hi_m, lo_m = meta.hi.mantissa_bits, meta.lo.mantissa_bits
    words = lax.bitcast_convert_type(x.reshape(m, n_words, 2), jnp.int32)
    k_tile = jnp.broadcast_to(jnp.broadcast_to(jnp.asarray(k, jnp.int32), (m,))[:, None], (m, K_COLS))
    chunk = plgpu.BlockSpec((ROWS, cw), lambda c: (0, c))
    f32, i32 = jnp.float32, jnp.int32

    def blocks(ref):
        return [ref.at[:, pl.ds(b * bw, bw)] for b in range(kb)]

    def body(x_g, k_g, o_g, keys_s, k_s, out_s, bar):
        i = lax.axis_index("r")
        rows = pl.ds(i * ROWS, ROWS)
        plgpu.copy_gmem_to_smem(k_g.at[rows], k_s, bar.at[0])

        def stage_out(c, tile_fn):
            # the pipelines' own output copies take a predicate the GPU interpreter lacks: a ring of STAGES tiles
            slot = lax.rem(c, STAGES)
            plgpu.wait_smem_to_gmem(STAGES - 1, wait_read_only=True)  # the slot's previous store has read it
            tile_fn(out_s.at[slot])
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_s.at[slot], o_g.at[rows, pl.ds(c * cw, cw)])

        def keys_of_chunk(idx, x_s):
            (c,) = idx
            col = _column_iota((ROWS, kc), interpret)
            tile = _wgmma(jnp.full((ROWS, kc), -1, i32), interpret)  # -1: no block, never counted
            halves = []
            for b, src in enumerate(blocks(x_s)):
                lo, hi = unpack_words(_load(src, interpret))
                if activation is not None:
                    lo, hi = activation_rounded(lo, activation), activation_rounded(hi, activation)
                    halves.append((lo, hi))
                key = block_key(_block_amax(lo, hi), c * kb + b, n_blocks, pos_bits)
                tile = jnp.where(col == b, rows_of(key, tile.shape), tile)
            keys_s.at[c][...] = tile
            if activation is not None:  # the activation to the output, which the cast pass reads back
                def write(dst):
                    for d, (lo, hi) in zip(blocks(dst), halves):
                        d[...] = pack_words(lo, hi)

                stage_out(c, write)

        plgpu.emit_pipeline(keys_of_chunk, grid=(n_chunks,), in_specs=[chunk],
                            max_concurrent_steps=min(STAGES, n_chunks))(x_g.at[rows])
        plgpu.wait_smem_to_gmem(0)

        plgpu.barrier_wait(bar.at[0])
        need = _load(k_s, interpret).astype(f32).max(axis=1)  # counts are exact in float32
        t = _row_vec(jnp.zeros((ROWS,), i32), interpret)
        for bit in reversed(range(bits)):
            cand = rows_of(t | jnp.int32(1 << bit), (ROWS, kc))

            def count(c, acc, cand=cand):
                kt = _load(keys_s.at[c], interpret)
                return acc + jnp.where(kt >= cand, jnp.ones(kt.shape, f32), jnp.zeros(kt.shape, f32))

            acc = lax.fori_loop(0, n_chunks, count, _wgmma(jnp.zeros((ROWS, kc), f32), interpret))
            t = jnp.where(acc.sum(axis=1) >= need, t | jnp.int32(1 << bit), t)
        # k <= 0: no block (no key reaches the largest int32)
        t = jnp.where(need > 0, t, jnp.full(t.shape, jnp.iinfo(jnp.int32).max, i32))

        def cast_chunk(idx, in_s):
            (c,) = idx
            out = []
            for b, src in enumerate(blocks(in_s)):
                lo, hi = unpack_words(_load(src, interpret))
                amax = _block_amax(lo, hi)
                chosen = block_key(amax, c * kb + b, n_blocks, pos_bits) >= t
                width = jnp.where(chosen, jnp.full(t.shape, hi_m, i32), jnp.full(t.shape, lo_m, i32))
                a, w = rows_of(amax, lo.shape), rows_of(width, lo.shape)
                out.append(pack_words(smx.fake_quantize_given_amax(lo, hi, a, meta.hi, w),
                                      smx.fake_quantize_given_amax(hi, lo, a, meta.hi, w)))

            def write(dst):
                for d, v in zip(blocks(dst), out):
                    d[...] = v

            stage_out(c, write)

        plgpu.emit_pipeline(cast_chunk, grid=(n_chunks,), in_specs=[chunk], max_concurrent_steps=min(STAGES, n_chunks))(
            (x_g if activation is None else o_g).at[rows])
        plgpu.wait_smem_to_gmem(0)

    scratch = [plgpu.SMEM((n_chunks, ROWS, kc), i32), plgpu.SMEM((ROWS, K_COLS), i32),
               plgpu.SMEM((STAGES, ROWS, cw), i32), plgpu.Barrier(num_arrivals=1, num_barriers=1)]
    out = row_block_kernel(body, jax.ShapeDtypeStruct((m, n_words), i32), m // ROWS, scratch, interpret)(words, k_tile)
    return lax.bitcast_convert_type(out, jnp.bfloat16).reshape(m, kdim)


__all__ = ["BLOCK", "CHUNK_WORDS", "ROWS", "block_key", "chunk_words", "key_bits", "key_cols", "smem_bytes", "split_cast_gpu",
           "supports"]
