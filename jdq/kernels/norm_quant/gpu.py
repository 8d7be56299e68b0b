"""LayerNorm + adaLN modulation + per-token quantization for Hopper in Mosaic GPU, one pass over HBM.

Computes :func:`jdq.kernels.norm_quant.ref.norm_quantize_rows`. Unfused, a W8A8 ``qkv`` / ``fc1``
input costs XLA's LayerNorm + modulation fusion (read ``x``, write ``h`` in bf16) and then the
token quantization (read ``h``, write the codes); here each CTA bulk-copies ``rows`` whole rows of
``x`` and its sample's modulation row (``1 + scale`` and ``shift``, float32) into shared memory,
then runs four passes — row sums (mean), squared deviations (variance), ``h`` (rounded to ``x``'s
dtype) with its row max |h|, the codes — and bulk-stores codes and scales: HBM traffic is one read
of ``x`` plus the codes. When a CTA's rows fit in registers (at most ``Config.reg_elems`` elements
per thread: 8 rows at K = 1152) they are read from shared memory once and the passes run on registers;
otherwise each pass re-reads shared memory and ``h`` is written back in place. Same arithmetic,
same order, either way (bit-identical results).

Register layout as :mod:`jdq.kernels.token_quant.gpu` (warps own rows, each lane 4 consecutive
columns: row reductions stay inside a warp); the modulation vectors are loaded in that layout
reduced over rows (replicated across the warps) and broadcast along the rows. A CTA's rows must
lie in one sample (``group_rows`` a multiple of the rows per CTA).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdq.kernels._mgpu import pl, plgpu, promise_in_bounds, row_block_kernel, row_layout
from jdq.kernels.norm_quant.ref import check_shapes, modulation_factors
from jdq.kernels.token_quant.gpu import store_codes
from jdq.kernels.token_quant.ref import FORMATS, MIN_SCALE, check_format

COLS = 128  # the layout's chunk width (elements): K must be a multiple


@dataclasses.dataclass(frozen=True)
class Config:
    """Shared-memory budget per CTA (picks the rows per CTA), elements per thread per chunk, and the most
    elements of ``x`` per thread kept in registers across the passes (more: shared-memory passes)."""

    smem_bytes: int = 72 * 1024
    elems_per_thread: int = 32
    reg_elems: int = 96

    def rows(self, m: int, k: int, itemsize: int, group_rows: int | None = None) -> int:
        """Rows per CTA: the largest power of two >= 4 within the budget dividing ``m`` and ``group_rows`` (0: none)."""
        group_rows = group_rows or m
        fits = lambda r: m % r == 0 and group_rows % r == 0  # noqa: E731
        r = 4
        while (r * 2) * k * (itemsize + 1) + 8 * k <= self.smem_bytes and fits(r * 2) and r < 64:
            r *= 2
        return r if fits(r) else 0

    def supports(self, m: int, k: int, itemsize: int = 2, group_rows: int | None = None) -> bool:
        """Whether (m, k, group_rows) fit: K a multiple of 128, rows per CTA dividing M and the group."""
        return k % COLS == 0 and self.rows(m, k, itemsize, group_rows) > 0


# jitted: identical calls in a model lower once (see jdq.kernels.w8a8.gpu).
@functools.partial(jax.jit, static_argnames=("group_rows", "eps", "fmt", "config", "interpret"))
def norm_quantize_rows_gpu(x, shift, scale, group_rows: int, eps: float = 1e-6, fmt: str = "int8",
                           config: Config = Config(), interpret=False):
    """Codes (M, K) and float32 scales (M,) of ``modulate(layer_norm(x), shift, scale)`` in one pass."""
    check_format(fmt)
    m, k, _ = check_shapes(x, shift, scale, group_rows)
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        raise TypeError(f"norm_quant kernel: x must be bfloat16 or float32, got {x.dtype}")
    isz = jnp.dtype(x.dtype).itemsize
    if not config.supports(m, k, isz, group_rows):
        raise ValueError(f"norm_quant kernel: M={m}, K={k}, group_rows={group_rows} do not fit {config} "
                         f"(K % {COLS}, rows per CTA dividing M and group_rows)")
    rows = config.rows(m, k, isz, group_rows)
    code_dtype, qmax = FORMATS[fmt]
    cols = COLS
    while k % (cols * 2) == 0 and rows * cols * 2 <= config.elems_per_thread * 128:
        cols *= 2
    n_chunks = k // cols
    in_regs = rows * k <= config.reg_elems * 128  # one warpgroup: 128 threads
    layout = None if interpret else row_layout()
    vec_layout = None if interpret else row_layout().reduce(0)
    inv_qmax, inv_k = np.float32(1.0 / qmax), np.float32(1.0 / k)
    mod = modulation_factors(shift, scale)  # (G, 2, K) float32

    def load(ref, c):
        sl = ref.at[:, pl.ds(c * cols, cols)]
        v = sl[...] if interpret else plgpu.load(sl, (), layout=layout)
        return v.astype(jnp.float32)

    def col_vec(m_s, j, c):  # the modulation row j, chunk c, broadcast over the rows
        sl = m_s.at[0, j, pl.ds(c * cols, cols)]
        v = sl[...] if interpret else plgpu.load(sl, (), layout=vec_layout)
        b = lax.broadcast_in_dim(v, (rows, cols), [1])
        return b if interpret else plgpu.layout_cast(b, layout)

    def row_vec(v):
        b = lax.broadcast_in_dim(v, (rows, cols), [0])
        return b if interpret else plgpu.layout_cast(b, layout)

    def body(x_g, mod_g, q_g, s_g, x_s, m_s, q_s, s_s, bar):
        i = lax.axis_index("m")
        g = (i * rows) // group_rows
        plgpu.copy_gmem_to_smem(x_g.at[pl.ds(i * rows, rows)], x_s, bar.at[0], **promise_in_bounds())
        plgpu.copy_gmem_to_smem(mod_g.at[pl.ds(g, 1)], m_s, bar.at[1], **promise_in_bounds())
        plgpu.barrier_wait(bar.at[0])
        regs = [load(x_s, c) for c in range(n_chunks)] if in_regs else None
        chunk = (lambda c: regs[c]) if in_regs else (lambda c: load(x_s, c))  # noqa: E731
        total = None
        for c in range(n_chunks):
            part = jnp.sum(chunk(c), axis=1)
            total = part if total is None else total + part
        mean = total * inv_k
        mean_b = row_vec(mean)
        sq = None
        for c in range(n_chunks):
            d = chunk(c) - mean_b
            part = jnp.sum(d * d, axis=1)
            sq = part if sq is None else sq + part
        rstd_b = row_vec(lax.rsqrt(sq * inv_k + np.float32(eps)))
        plgpu.barrier_wait(bar.at[1])
        amax = None
        for c in range(n_chunks):
            h = ((chunk(c) - mean_b) * rstd_b) * col_vec(m_s, 0, c) + col_vec(m_s, 1, c)
            h = h.astype(x.dtype)
            if in_regs:
                regs[c] = h.astype(jnp.float32)
            else:
                x_s[:, pl.ds(c * cols, cols)] = h
            a = jnp.max(jnp.abs(h.astype(jnp.float32)), axis=1)
            amax = a if amax is None else jnp.maximum(amax, a)
        s = jnp.maximum(amax * inv_qmax, np.float32(MIN_SCALE))
        store_codes(chunk, n_chunks, cols, row_vec(1.0 / s), s, fmt, q_s, s_s, q_g, s_g, i * rows)

    out_type = (jax.ShapeDtypeStruct((m, k), code_dtype), jax.ShapeDtypeStruct((m,), jnp.float32))
    scratch = [
        plgpu.SMEM((rows, k), x.dtype),
        plgpu.SMEM((1, 2, k), jnp.float32),
        plgpu.SMEM((rows, k), code_dtype),
        plgpu.SMEM((rows,), jnp.float32),
        plgpu.Barrier(num_arrivals=1, num_barriers=2),
    ]
    return row_block_kernel(body, out_type, m // rows, scratch, interpret, grid_name="m")(x, mod)


__all__ = ["COLS", "Config", "norm_quantize_rows_gpu"]
