"""W4A8 GEMM for Hopper in Mosaic GPU: int4 weights unpacked in the kernel, int8 WGMMA, group scales.

Computes :func:`jdq.kernels.w4a8.ref.w4a8_matmul`. One warpgroup per CTA, a (M/tile_m, N/tile_n)
grid, ``emit_pipeline`` over K in steps of 128 features (one packed block of
:func:`~jdq.kernels.weight_only.ref.pack_int4`: byte ``j`` holds feature ``j`` low and ``j + 64``
high). Per step the TMA brings the two 64-wide halves of the int8 activation tile and the
(tile_n, 64) packed weight tile; the warpgroup sign-extends the two nibbles (shifts of the 16-bit
upcast: 8-bit arithmetic is not available in registers), stores the two int8 (tile_n, 64) halves
K-major into swizzled shared memory, and issues two int8 WGMMAs (K = 64 each).

Scales: per output channel (``G = 1``) one int32 accumulator covers all of K and the epilogue
applies ``s_x · s_w``; with groups (``group_size`` 64 or a multiple of 128), each group's int32
partial is converted and added, times its scale, into a float32 register carry, in group order
(the reference's order). The epilogue multiplies by ``s_x``, adds the bias and stores by TMA.

``Config.kind="rega"`` (:func:`_rega_matmul`, the H200 default): the unpacked halves stay in
registers as the int8 WGMMA's A operand (yᵀ = Ŵ · xᵀ) instead of going through shared memory;
same float order, 2.0–2.2× faster with groups of 64 (run 15 in ``jdq/kernels/NOTES.md``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jdq.kernels._mgpu import (bcast_vec, kmajor_operand, kmajor_spec, pl, plgpu, rhs_kmajor, smem_transforms, store_tile,
                               tiled_kernel, wgmma_partial, wgmma_register_a, zeros_carry)

HALF = 64  # features per nibble half of a packed 128-block


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of the W4A8 GPU kernel (K is stepped by one packed 128-block)."""

    tile_m: int = 128
    tile_n: int = 128
    stages: int = 3
    kind: str = "smem"  # "smem": unpacked halves via shared memory; "rega": WGMMA A operand from registers

    def supports(self, m: int, n: int, k: int, group_size: int) -> bool:
        """Whether the shape and the group size fit this config's tiles."""
        rega_ok = self.kind != "rega" or (self.tile_n % 64 == 0 and self.tile_m <= 256 and self.tile_m % 64 == 0)
        return (m % self.tile_m == 0 and n % self.tile_n == 0 and k % 128 == 0
                and (group_size == HALF or group_size % 128 == 0) and k % group_size == 0 and rega_ok)


def _unpack(c, interpret):
    """Packed (tn, 64) int8 bytes -> the (lo, hi) int8 halves, sign-extended."""
    c16 = c.astype(jnp.int16)
    lo = lax.shift_right_arithmetic(lax.shift_left(c16, jnp.int16(12)), jnp.int16(12)).astype(jnp.int8)
    hi = lax.shift_right_arithmetic(c16, jnp.int16(4)).astype(jnp.int8)
    if interpret:  # the interpreter reads B untransposed: store (64, tn)
        return lo.T, hi.T
    return lo, hi


# jitted: identical calls in a model lower once (see jdq.kernels.w8a8.gpu).
@functools.partial(jax.jit, static_argnames=("group_size", "out_dtype", "config", "interpret"))
def w4a8_matmul_gpu(xq, xs, wq_packed, ws, b=None, group_size: int | None = None, out_dtype=jnp.bfloat16,
                    config: Config = Config(), interpret=False):
    """W4A8 GEMM ``(M, K) int8 × packed int4 (N, K/2) -> (M, N)``, per-channel or per-group scales ``ws`` (N, G)."""
    m, k = xq.shape
    n = wq_packed.shape[0]
    gs = k if group_size is None else group_size
    if xq.dtype != jnp.int8 or wq_packed.dtype != jnp.int8:
        raise TypeError(f"w4a8 GPU kernel needs int8 activations and int8-packed weights, got {xq.dtype}, {wq_packed.dtype}")
    if wq_packed.shape != (n, k // 2):
        raise ValueError(f"w4a8: packed weight {wq_packed.shape} does not fit activation {xq.shape} (want ({n}, {k // 2}))")
    groups = k // gs
    ws = jnp.asarray(ws, jnp.float32).reshape(n, -1)
    if ws.shape[1] != groups or k % gs:
        raise ValueError(f"w4a8: scales {ws.shape} do not fit K={k} in groups of {gs}")
    if xs.shape != (m,):
        raise ValueError(f"w4a8: xs shape {xs.shape}, want ({m},)")
    if not config.supports(m, n, k, gs):
        raise ValueError(f"w4a8: M={m} N={n} K={k} group_size={gs} do not fit {config}")
    b = jnp.zeros((n,), jnp.float32) if b is None else jnp.asarray(b, jnp.float32)
    xs = jnp.asarray(xs, jnp.float32)
    out_dtype = jnp.dtype(out_dtype)
    if config.kind == "rega":
        return _rega_matmul(xq, xs, wq_packed, ws, b, gs, out_dtype, config, interpret)
    if config.kind != "smem":
        raise ValueError(f"w4a8 GPU config.kind must be 'smem' or 'rega', got {config.kind!r}")
    tm, tn = config.tile_m, config.tile_n
    tile = (tm, tn)
    h_tr = smem_transforms(HALF, jnp.int8, interpret)
    w_shape = (HALF, tn) if interpret else (tn, HALF)
    steps = k // 128

    def body(x_g, c_g, xs_g, ws_g, b_g, o_g, w_lo, w_hi, o_s):
        mi = lax.axis_index("m")
        ni = lax.axis_index("n")
        specs = [
            plgpu.BlockSpec((tm, HALF), lambda kk: (mi, 2 * kk), transforms=h_tr),
            plgpu.BlockSpec((tm, HALF), lambda kk: (mi, 2 * kk + 1), transforms=h_tr),
            plgpu.BlockSpec((tn, HALF), lambda kk: (ni, kk), transforms=h_tr),
        ]

        def unpack_to_smem(c_s):
            lo, hi = _unpack(c_s[...], interpret)
            w_lo[...] = lo
            w_hi[...] = hi
            plgpu.commit_smem()

        def col_scale(g):
            return bcast_vec(ws_g.at[g], ni * tn, tile, 1, interpret)

        if groups == 1:
            def scope(acc):
                def step(_, x0, x1, c_s):
                    unpack_to_smem(c_s)
                    plgpu.wgmma(acc, x0, rhs_kmajor(w_lo, interpret))
                    plgpu.wgmma(acc, x1, rhs_kmajor(w_hi, interpret))
                    plgpu.wgmma_wait(0)

                plgpu.emit_pipeline(step, grid=(steps,), in_specs=specs, max_concurrent_steps=config.stages)(x_g, x_g, c_g)
                return acc[...]

            y = pl.run_scoped(scope, plgpu.ACC(tile, jnp.int32)).astype(jnp.float32)
            y = y * bcast_vec(xs_g, mi * tm, tile, 0, interpret) * col_scale(0)
        else:
            def part(x_s, w_s):
                return wgmma_partial(x_s, w_s, tile, jnp.int32, interpret).astype(jnp.float32)

            def step(idx, x0, x1, c_s, carry):
                (kk,) = idx
                unpack_to_smem(c_s)
                if gs == HALF:
                    carry = carry + part(x0, w_lo) * col_scale(2 * kk)
                    return carry + part(x1, w_hi) * col_scale(2 * kk + 1)
                g = (kk * 128) // gs

                def scope(acc):
                    plgpu.wgmma(acc, x0, rhs_kmajor(w_lo, interpret))
                    plgpu.wgmma(acc, x1, rhs_kmajor(w_hi, interpret))
                    plgpu.wgmma_wait(0)
                    return acc[...]

                p = pl.run_scoped(scope, plgpu.ACC(tile, jnp.int32)).astype(jnp.float32)
                return carry + p * col_scale(g)

            y = plgpu.emit_pipeline(step, grid=(steps,), in_specs=specs, max_concurrent_steps=config.stages,
                                    init_carry=zeros_carry(tile, interpret))(x_g, x_g, c_g)
            y = y * bcast_vec(xs_g, mi * tm, tile, 0, interpret)
        y = y + bcast_vec(b_g, ni * tn, tile, 1, interpret)
        store_tile(y, o_s, o_g, mi, ni)

    w_tr = smem_transforms(w_shape[1], jnp.int8, interpret)
    scratch = [plgpu.SMEM(w_shape, jnp.int8, transforms=w_tr), plgpu.SMEM(w_shape, jnp.int8, transforms=w_tr)]
    return tiled_kernel(body, m, n, tm, tn, out_dtype, scratch, interpret)(xq, wq_packed, xs, ws.T, b)


def _rega_matmul(xq, xs, wq_packed, ws, b, gs, out_dtype, config, interpret):
    """``kind="rega"``: yᵀ = Ŵ · xᵀ with the unpacked int4 halves as the int8 WGMMA's register A operand.

    The structure of :func:`jdq.kernels.weight_only.gpu._rega_matmul`: no shared-memory store of the
    unpacked weight, the int8 activation halves are the K-major B operand. Same float order as the
    reference (group partials rescaled in group order, then ``s_x``, then the bias): bit-exact
    with it where the shared-memory kernel is. The (N, M) result is transposed by XLA.
    """
    m, k = xq.shape
    n = wq_packed.shape[0]
    tm, tn = config.tile_m, config.tile_n
    groups = k // gs
    steps = k // 128
    tile = (tn, tm)
    h_tr = smem_transforms(HALF, jnp.int8, interpret)

    def body(c_g, x_g, xs_g, ws_g, b_g, o_g, *scratch):
        *a_scratch, o_s = scratch
        ni = lax.axis_index("m")  # the output is yᵀ (N, M): grid axis "m" walks N tiles, "n" walks M tiles
        mi = lax.axis_index("n")
        specs = [
            plgpu.BlockSpec((tn, HALF), lambda kk: (ni, kk), transforms=h_tr),
            kmajor_spec(tm, HALF, lambda kk: (mi, 2 * kk), h_tr, interpret),
            kmajor_spec(tm, HALF, lambda kk: (mi, 2 * kk + 1), h_tr, interpret),
        ]

        def halves(c_s):
            c16 = c_s[...].astype(jnp.int16)
            lo = lax.shift_right_arithmetic(lax.shift_left(c16, jnp.int16(12)), jnp.int16(12)).astype(jnp.int8)
            return lo, lax.shift_right_arithmetic(c16, jnp.int16(4)).astype(jnp.int8)

        def mma(acc, a, x_view):
            wgmma_register_a(acc, a, x_view, a_scratch[0] if interpret else None, interpret)

        def row_scale(g):
            return bcast_vec(ws_g.at[g], ni * tn, tile, 0, interpret)

        if groups == 1:
            def step(_, c_s, x0, x1, acc):
                lo, hi = halves(c_s)
                mma(acc, lo, x0)
                mma(acc, hi, x1)
                plgpu.wgmma_wait(0)
                return acc

            def scope(acc):
                plgpu.emit_pipeline(step, grid=(steps,), in_specs=specs, max_concurrent_steps=config.stages,
                                    init_carry=acc)(c_g, x_g, x_g)
                return acc[...]

            y = pl.run_scoped(scope, plgpu.ACC(tile, jnp.int32)).astype(jnp.float32)
            y = y * bcast_vec(xs_g, mi * tm, tile, 1, interpret) * row_scale(0)  # the reference's order
        else:
            def part(*pairs):
                def scope(acc):
                    for a, x_view in pairs:
                        mma(acc, a, x_view)
                    plgpu.wgmma_wait(0)
                    return acc[...]

                return pl.run_scoped(scope, plgpu.ACC(tile, jnp.int32)).astype(jnp.float32)

            def step(idx, c_s, x0, x1, carry):
                (kk,) = idx
                lo, hi = halves(c_s)
                if gs == HALF:
                    carry = carry + part((lo, x0)) * row_scale(2 * kk)
                    return carry + part((hi, x1)) * row_scale(2 * kk + 1)
                return carry + part((lo, x0), (hi, x1)) * row_scale((kk * 128) // gs)

            init = jnp.zeros(tile, jnp.float32)
            y = plgpu.emit_pipeline(step, grid=(steps,), in_specs=specs, max_concurrent_steps=config.stages,
                                    init_carry=init)(c_g, x_g, x_g)
            y = y * bcast_vec(xs_g, mi * tm, tile, 1, interpret)
        y = y + bcast_vec(b_g, ni * tn, tile, 0, interpret)
        store_tile(y, o_s, o_g, ni, mi)

    scratch = [plgpu.SMEM((tn, HALF), jnp.int8)] if interpret else []
    out_t = tiled_kernel(body, n, m, tn, tm, out_dtype, scratch, interpret, warpgroup_semantics=True)(
        wq_packed, kmajor_operand(xq, interpret), xs, ws.T, b)
    return out_t.T


__all__ = ["Config", "w4a8_matmul_gpu"]
