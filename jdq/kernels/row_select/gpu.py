"""Per-row radix threshold of distinct int32 keys in one Mosaic GPU pass: :func:`jdq.kernels.row_select.ref.threshold`.

XLA has no fast way to this number: a stable argsort per row, or radix passes that are each a
reduction fusion over the keys (measured slower than the sort on an H200; RESULTS §3 "Twelfth
round"). Here each CTA bulk-copies 64 rows of keys (and their ``k``) into shared memory and finds
the threshold bit by bit, most significant first, with the whole row block on chip: per bit,
``count(keys >= t | bit)`` is a row reduction over the tile in the WGMMA register layout (read
from shared memory in column chunks of at most :data:`CHUNK_COLS`, which bounds the registers), and
the bit is kept where the count reaches ``k``. ``bits`` passes, one read of the keys from HBM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jdq.kernels._mgpu import pl, plgpu, promise_in_bounds, row_block_kernel, rows_of, store_rows

ROWS = 64  # rows per CTA (the WGMMA layout's row tile)
K_COLS = 8  # k is handed in as (M, 8) int32, the narrowest WGMMA-layout tile of 32-bit values
CHUNK_COLS = 128  # key columns held in registers at a time
MAX_COLS = 768  # 64 rows of keys in shared memory (192 KiB; 1024 would not fit)


def supports(m: int, n: int, bits: int) -> str | None:
    """``None`` when (M, n) keys of ``bits`` bits tile the kernel, else why not."""
    from jdq.kernels.row_select.ref import MAX_BITS

    if m % ROWS:
        return f"{m} rows are not a multiple of {ROWS}"
    if n % 8 or n > MAX_COLS:
        return f"{n} keys per row: the kernel takes multiples of 8 up to {MAX_COLS}"
    if not 1 <= bits <= MAX_BITS:
        return f"{bits}-bit keys: the kernel takes 1 to {MAX_BITS}"
    return None


def _chunk(n: int) -> int:
    # a row pitch that is a multiple of 128 bytes puts the WGMMA layout's rows in one bank: no load plan
    return next(c for c in range(min(n, CHUNK_COLS) // 8 * 8, 0, -8) if n % c == 0 and c % 32)


@functools.partial(jax.jit, static_argnames=("bits", "interpret"))
def threshold_gpu(keys, k, *, bits: int, interpret=False):
    """(M,) int32 thresholds of distinct non-negative int32 ``keys`` (M, n) for int32 ``k`` (scalar or (M,))."""
    if keys.ndim != 2 or keys.dtype != jnp.int32:
        raise ValueError(f"row_select kernel: keys must be (M, n) int32, got {keys.shape} {keys.dtype}")
    m, n = keys.shape
    why = supports(m, n, bits)
    if why:
        raise ValueError(f"row_select kernel: {why}")
    k_tile = jnp.broadcast_to(jnp.broadcast_to(jnp.asarray(k, jnp.int32), (m,))[:, None], (m, K_COLS))
    chunk = _chunk(n)
    layout = None if interpret else plgpu.Layout.WGMMA
    f32 = jnp.float32

    def load(ref):
        return ref[...] if interpret else plgpu.load(ref, (), layout=layout)

    chunks = n // chunk

    def body(keys_g, k_g, t_g, keys_s, k_s, t_s, bar):
        i = lax.axis_index("r")
        rows = pl.ds(i * ROWS, ROWS)
        plgpu.copy_gmem_to_smem(k_g.at[rows], k_s, bar.at[chunks], **promise_in_bounds())
        for c in range(chunks):  # each column chunk its own contiguous (ROWS, chunk) tile
            plgpu.copy_gmem_to_smem(keys_g.at[rows, pl.ds(c * chunk, chunk)], keys_s.at[c], bar.at[c])
        plgpu.barrier_wait(bar.at[chunks])
        need = load(k_s).astype(f32).max(axis=1)  # each row's k (counts are exact in float32: n < 2**24)
        for c in range(chunks):
            plgpu.barrier_wait(bar.at[c])
        t = jnp.zeros((ROWS,), jnp.int32)
        if not interpret:  # a constant is splat; the loop's selects want the row reductions' layout
            t = plgpu.layout_cast(t, plgpu.Layout.WGMMA.reduce(1))
        for b in reversed(range(bits)):
            cand = t | jnp.int32(1 << b)
            count = None
            for c in range(chunks):
                x = load(keys_s.at[c])
                part = jnp.where(x >= rows_of(cand, x.shape), jnp.ones(x.shape, f32), jnp.zeros(x.shape, f32)).sum(axis=1)
                count = part if count is None else count + part
            t = jnp.where(count >= need, cand, t)
        t_s[...] = rows_of(t, (ROWS, K_COLS))
        store_rows(t_s, t_g, i * ROWS)

    scratch = [plgpu.SMEM((chunks, ROWS, chunk), jnp.int32), plgpu.SMEM((ROWS, K_COLS), jnp.int32),
               plgpu.SMEM((ROWS, K_COLS), jnp.int32), plgpu.Barrier(num_arrivals=1, num_barriers=chunks + 1)]
    out = row_block_kernel(body, jax.ShapeDtypeStruct((m, K_COLS), jnp.int32), m // ROWS, scratch, interpret)(keys, k_tile)
    return out[:, 0]


__all__ = ["CHUNK_COLS", "MAX_COLS", "ROWS", "supports", "threshold_gpu"]
