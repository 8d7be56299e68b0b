"""One-pass per-token quantization for Hopper in Mosaic GPU: bf16/f32 rows in, int8/E4M3 codes + scales out.

Computes :func:`jdq.kernels.token_quant.ref.quantize_rows`. XLA computes it as two fusions (a row
max, then the elementwise quantization), reading the activation from HBM twice; here each CTA
brings ``rows`` whole rows to shared memory with one bulk copy (contiguous, so no TMA box limit),
then makes two passes over shared memory (row max |x|, then the codes) and writes the codes and
the scales back with bulk copies: HBM traffic is one read of ``x`` plus the codes, the floor for
this op.

Register layout: a tiled layout in which each warp owns whole rows of a (4·r, 128·c) chunk and
each lane holds 4 consecutive elements of a row (8 or 16 bytes per access, no bank conflicts), so
the row reduction stays inside a warp (shuffles, no shared-memory scratch). Shared memory per
CTA is ``rows · K · (itemsize + 1)`` bytes; ``Config.smem_bytes`` sets the budget that picks
``rows`` (a smaller budget lets more CTAs share an SM and overlap one CTA's copy with another's
arithmetic).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdq.kernels._mgpu import pl, plgpu, promise_in_bounds, row_block_kernel, row_layout
from jdq.kernels.token_quant.ref import FORMATS, MIN_SCALE, check_format

COLS = 128  # the layout's chunk width (elements): K must be a multiple


@dataclasses.dataclass(frozen=True)
class Config:
    """Shared-memory budget per CTA (picks the rows per CTA) and the elements per thread per chunk."""

    smem_bytes: int = 72 * 1024
    elems_per_thread: int = 32

    def rows(self, m: int, k: int, itemsize: int) -> int:
        """Rows per CTA: the largest power of two >= 4 within the budget that divides ``m`` (0: none)."""
        r = 4
        while r * 2 * k * (itemsize + 1) <= self.smem_bytes and m % (r * 2) == 0 and r < 64:
            r *= 2
        return r if m % r == 0 else 0

    def supports(self, m: int, k: int, itemsize: int = 2) -> bool:
        """Whether (m, k) fit: K a multiple of 128, M a multiple of the rows per CTA."""
        return k % COLS == 0 and self.rows(m, k, itemsize) > 0


def store_codes(chunk, n_chunks: int, cols: int, inv_scale, s, fmt: str, q_s, s_s, q_g, s_g, row0):
    """Codes of ``chunk(c) · inv_scale`` (c < ``n_chunks``, ``cols`` wide) into ``q_s``, scales ``s`` into
    ``s_s``, then both bulk-stored at row ``row0`` of ``q_g`` / ``s_g`` (int8: round half to even and
    clip; E4M3: clip, then the saturating conversion, which rounds to nearest even)."""
    code_dtype, qmax = FORMATS[fmt]
    for c in range(n_chunks):
        v = chunk(c) * inv_scale
        if fmt == "int8":
            q = jnp.clip(lax.round(v, lax.RoundingMethod.TO_NEAREST_EVEN), -qmax, qmax)
        else:
            q = jnp.clip(v, -qmax, qmax)
        q_s[:, pl.ds(c * cols, cols)] = q.astype(code_dtype)
    s_s[...] = s
    plgpu.commit_smem()
    rows = q_s.shape[0]
    plgpu.copy_smem_to_gmem(q_s, q_g.at[pl.ds(row0, rows)])
    plgpu.copy_smem_to_gmem(s_s, s_g.at[pl.ds(row0, rows)])
    plgpu.wait_smem_to_gmem(0)


# jitted: identical calls in a model lower once (see jdq.kernels.w8a8.gpu).
@functools.partial(jax.jit, static_argnames=("fmt", "config", "interpret"))
def quantize_rows_gpu(x, fmt: str = "int8", config: Config = Config(), interpret=False):
    """Per-row quantization of ``x`` (M, K) bf16/f32 in one pass: (codes (M, K), float32 scales (M,))."""
    check_format(fmt)
    if x.ndim != 2:
        raise ValueError(f"token quantization kernel: x must be 2-D (M, K), got shape {x.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        raise TypeError(f"token quantization kernel: x must be bfloat16 or float32, got {x.dtype}")
    m, k = x.shape
    isz = jnp.dtype(x.dtype).itemsize
    if not config.supports(m, k, isz):
        raise ValueError(f"token quantization kernel: M={m}, K={k} do not fit {config} (K % {COLS}, M % rows)")
    rows = config.rows(m, k, isz)
    code_dtype, qmax = FORMATS[fmt]
    # chunk width: a multiple of COLS dividing K, about elems_per_thread elements per thread
    cols = COLS
    while k % (cols * 2) == 0 and rows * cols * 2 <= config.elems_per_thread * 128:
        cols *= 2
    layout = None if interpret else row_layout()
    inv_qmax = np.float32(1.0 / qmax)

    def load(ref, c):
        sl = ref.at[:, pl.ds(c * cols, cols)]
        v = sl[...] if interpret else plgpu.load(sl, (), layout=layout)
        return v.astype(jnp.float32)

    def bcast(v):
        b = lax.broadcast_in_dim(v, (rows, cols), [0])
        return b if interpret else plgpu.layout_cast(b, layout)

    def body(x_g, q_g, s_g, x_s, q_s, s_s, bar):
        i = lax.axis_index("m")
        plgpu.copy_gmem_to_smem(x_g.at[pl.ds(i * rows, rows)], x_s, bar.at[0], **promise_in_bounds())
        plgpu.barrier_wait(bar.at[0])
        amax = None
        for c in range(k // cols):
            a = jnp.max(jnp.abs(load(x_s, c)), axis=1)
            amax = a if amax is None else jnp.maximum(amax, a)
        s = jnp.maximum(amax * inv_qmax, np.float32(MIN_SCALE))
        store_codes(lambda c: load(x_s, c), k // cols, cols, bcast(1.0 / s), s, fmt, q_s, s_s, q_g, s_g, i * rows)

    out_type = (jax.ShapeDtypeStruct((m, k), code_dtype), jax.ShapeDtypeStruct((m,), jnp.float32))
    scratch = [
        plgpu.SMEM((rows, k), x.dtype),
        plgpu.SMEM((rows, k), code_dtype),
        plgpu.SMEM((rows,), jnp.float32),
        plgpu.Barrier(num_arrivals=1, num_barriers=1),
    ]
    return row_block_kernel(body, out_type, m // rows, scratch, interpret, grid_name="m")(x)


__all__ = ["COLS", "Config", "quantize_rows_gpu", "store_codes"]
