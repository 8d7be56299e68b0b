"""MX block-scaled GEMM for Hopper in Mosaic GPU: one 8-bit WGMMA per 32-K block, rescaled into a float32 carry.

Computes :func:`jdq.kernels.mx.ref.mx_matmul` for MXFP8 (E4M3 WGMMA, float32 accumulator) and
MXINT8 (int8 WGMMA, int32 accumulator). One warpgroup per CTA, a (M/tile_m, N/tile_n) grid,
``emit_pipeline`` over K in steps of ``blocks_per_step`` MX blocks; each block arrives as its own
(tile, 32) shared-memory tile (32-byte swizzle), so a WGMMA never mixes two blocks. Per block the
partial product goes into a fresh accumulator and ``carry += (acc · a_g[m]) · b_g[n]`` (block
scales loaded from the transposed (K/32, rows) float32 arrays), in block order; the epilogue adds
the bias, casts and stores by TMA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jdq.kernels._mgpu import (bcast_vec, kmajor_operand, kmajor_spec, plgpu, smem_transforms, store_tile, tiled_kernel,
                               wgmma_partial, zeros_carry)
from jdq.kernels.mx.ref import BLOCK


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of the MX GPU kernel (``blocks_per_step`` MX blocks of 32 per pipeline step)."""

    tile_m: int = 128
    tile_n: int = 128
    blocks_per_step: int = 4
    stages: int = 2

    def supports(self, m: int, n: int, k: int) -> bool:
        """Whether the shape fits the tiles and the K step."""
        return m % self.tile_m == 0 and n % self.tile_n == 0 and k % (BLOCK * self.blocks_per_step) == 0


# jitted: identical calls in a model lower once (see jdq.kernels.w8a8.gpu).
@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def mx_matmul_gpu(xq, xs, wq, ws, b=None, out_dtype=jnp.bfloat16, config: Config = Config(), interpret=False):
    """MX GEMM ``(M, K) × (N, K) -> (M, N)`` with float32 block scales ``xs`` (K/32, M), ``ws`` (K/32, N)."""
    m, k = xq.shape
    n = wq.shape[0]
    if xq.dtype != wq.dtype or xq.dtype not in (jnp.int8, jnp.float8_e4m3fn):
        raise TypeError(f"MX GEMM kernel: codes must both be int8 or float8_e4m3fn, got {xq.dtype}, {wq.dtype}")
    g = k // BLOCK
    if wq.shape != (n, k) or xs.shape != (g, m) or ws.shape != (g, n):
        raise ValueError(f"MX GEMM kernel: xq {xq.shape}, wq {wq.shape}, xs {xs.shape}, ws {ws.shape} disagree")
    if not config.supports(m, n, k):
        raise ValueError(f"MX GEMM kernel: M={m} N={n} K={k} do not fit {config}")
    b = jnp.zeros((n,), jnp.float32) if b is None else jnp.asarray(b, jnp.float32)
    out_dtype = jnp.dtype(out_dtype)
    acc_dtype = jnp.int32 if xq.dtype == jnp.int8 else jnp.float32
    tm, tn, bps = config.tile_m, config.tile_n, config.blocks_per_step
    tile = (tm, tn)
    tr = smem_transforms(BLOCK, xq.dtype, interpret)

    def body(x_g, w_g, xs_g, ws_g, b_g, o_g, o_s):
        mi = lax.axis_index("m")
        ni = lax.axis_index("n")
        x_specs = [plgpu.BlockSpec((tm, BLOCK), lambda kk, j=j: (mi, kk * bps + j), transforms=tr) for j in range(bps)]
        w_specs = [kmajor_spec(tn, BLOCK, lambda kk, j=j: (ni, kk * bps + j), tr, interpret) for j in range(bps)]

        def step(idx, *refs):
            (kk,) = idx
            xs_refs, ws_refs, carry = refs[:bps], refs[bps:2 * bps], refs[-1]
            for j in range(bps):
                gi = kk * bps + j
                a = bcast_vec(xs_g.at[gi], mi * tm, tile, 0, interpret)
                c = bcast_vec(ws_g.at[gi], ni * tn, tile, 1, interpret)
                p = wgmma_partial(xs_refs[j], ws_refs[j], tile, acc_dtype, interpret).astype(jnp.float32)
                carry = carry + (p * a) * c
            return carry

        y = plgpu.emit_pipeline(step, grid=(k // (BLOCK * bps),), in_specs=x_specs + w_specs,
                                max_concurrent_steps=config.stages, init_carry=zeros_carry(tile, interpret))(
                                    *([x_g] * bps + [w_g] * bps))
        y = y + bcast_vec(b_g, ni * tn, tile, 1, interpret)
        store_tile(y, o_s, o_g, mi, ni)

    return tiled_kernel(body, m, n, tm, tn, out_dtype, interpret=interpret)(
        xq, kmajor_operand(wq, interpret), jnp.asarray(xs, jnp.float32), jnp.asarray(ws, jnp.float32), b)


__all__ = ["Config", "mx_matmul_gpu"]
