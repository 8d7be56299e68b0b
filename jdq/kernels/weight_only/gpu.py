"""Weight-only W8A16 / W4A16 GEMM for Hopper in Mosaic GPU: integer weights dequantized in the kernel.

Computes :func:`jdq.kernels.weight_only.ref.weight_only_matmul` for ``x`` (M, K) bf16 and int8
codes (N, K) (or int4 packed (N, K/2), the layout of :func:`~jdq.kernels.weight_only.ref.pack_int4`)
with float32 scales (N, G). XLA cannot fuse the dequantization into its GEMM (it writes a bf16
copy of the weight first); here the weight crosses HBM once, in its packed form.

Per K step (``tile_k`` = 128) the pipeline brings an x tile and a code tile to shared memory by
TMA; the warpgroup loads the codes to registers and converts them to bf16 (exact: |code| ≤ 127;
int4: the two nibbles of the 16-bit upcast, the two contiguous 64-wide halves, become bf16 by bit
arithmetic, :func:`_int4_to_bf16`),
stores the bf16 tile to a swizzled shared buffer and runs a bf16 WGMMA against it (transposed
view: K-major B is allowed for 16-bit types). Scales are not applied to the weight tile:

* per channel (``G == 1``): one float32 accumulator over all of K, scaled in the epilogue;
* per group (``group_size`` a multiple of ``tile_k``): each group's partial product is
  accumulated separately and added, times its scales, into a float32 register carry.

The epilogue adds the bias, casts, and stores through shared memory by TMA. Differences from the
reference are float rounding only (bf16 products are exact in the f32 accumulator; the order of
the sums differs).

``Config.split_k`` > 1 (split-K) adds a grid axis: each CTA runs ``K / split_k`` of the K steps
and stores a float32 partial product; XLA sums the partials and adds the bias. It pays where
(M / tile_m) · (N / tile_n) CTAs leave SMs idle and K is long (DiT fc2 at batch 1–4, run 9 in
``jdq/kernels/NOTES.md``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jdq.kernels._mgpu import bcast_vec, pl, plgpu, rhs_kmajor, smem_transforms, store_tile, tiled_kernel, zeros_carry


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of the weight-only GPU kernel."""

    tile_m: int = 64
    tile_n: int = 128
    tile_k: int = 128
    stages: int = 4
    split_k: int = 1  # K ranges run by separate CTAs; their float32 partial products are summed after

    def supports(self, n: int, k: int, group_size: int, bits: int) -> bool:
        """Whether N, K and the group size fit this config's tiles."""
        return (n % self.tile_n == 0 and k % (self.tile_k * self.split_k) == 0 and group_size % self.tile_k == 0
                and (bits == 8 or self.tile_k == 128))

    def smem_bytes(self, bits: int, out_itemsize: int = 2) -> int:
        """Shared memory of the buffers: ``stages`` x and code tiles, the dequantized tile, the output tile."""
        kc = self.tile_k if bits == 8 else self.tile_k // 2
        out_itemsize = 4 if self.split_k > 1 else out_itemsize  # split-K stages float32 partials
        return (self.stages * (self.tile_m * self.tile_k * 2 + self.tile_n * kc) + self.tile_n * self.tile_k * 2
                + self.tile_m * self.tile_n * out_itemsize)

    def acc_registers(self, grouped: bool) -> int:
        """32-bit registers per thread that the float32 accumulator (and, with groups, the carry) occupy."""
        return self.tile_m * self.tile_n // 128 * (2 if grouped else 1)


def _int4_to_bf16(nibble):
    """bf16 values of two's-complement int4 ``nibble`` (int16 in [0, 15]), by bit arithmetic."""
    bits = (nibble ^ jnp.int16(0x8)) | jnp.int16(0x4300)
    return lax.bitcast_convert_type(bits, jnp.bfloat16) - jnp.bfloat16(136)


# jitted: identical calls in a model lower once (see jdq.kernels.w8a8.gpu).
@functools.partial(jax.jit, static_argnames=("bits", "group_size", "out_dtype", "config", "interpret"))
def weight_only_matmul_gpu(x, codes, scale, b, bits: int, group_size: int, out_dtype=jnp.bfloat16,
                           config: Config = Config(), interpret=False):
    """``x (M, K) · Ŵᵀ + b`` with int8 / packed-int4 codes and per-channel or per-group scales."""
    m, k = x.shape
    n = codes.shape[0]
    tm, tn, tk = config.tile_m, config.tile_n, config.tile_k
    if bits not in (4, 8):
        raise ValueError(f"weight-only GPU kernel: bits must be 4 or 8, got {bits}")
    kc = tk if bits == 8 else tk // 2
    if codes.shape != (n, k if bits == 8 else k // 2):
        raise ValueError(f"weight-only: codes shape {codes.shape} does not fit x {x.shape} with bits={bits}")
    if m % tm or not config.supports(n, k, group_size, bits):
        raise ValueError(f"weight-only: M={m} N={n} K={k} group_size={group_size} do not fit {config}")
    groups = k // group_size
    scale = jnp.asarray(scale, jnp.float32).reshape(n, groups)
    b = jnp.zeros((n,), jnp.float32) if b is None else jnp.asarray(b, jnp.float32)
    x = x.astype(jnp.bfloat16)
    out_dtype = jnp.dtype(out_dtype)
    x_tr = smem_transforms(tk, jnp.bfloat16, interpret)
    c_tr = smem_transforms(kc, jnp.int8, interpret)
    tile = (tm, tn)
    steps_per_group = group_size // tk
    splits = config.split_k
    k_steps = k // tk // splits  # K steps per CTA
    # interpret mode reads B untransposed: the dequantized tile is stored (tk, tn) there
    wd_shape = (tk, tn) if interpret else (tn, tk)

    def dequant_to_smem(c_s, wd_s):
        c = c_s[...]
        if interpret:
            c = c.T
        if bits == 8:
            wd_s[...] = c.astype(jnp.bfloat16)
            return
        # int4 -> bf16 without an int -> float conversion: (nibble ^ 8) is the code + 8 in [0, 15];
        # or-ed into the bits of bf16 128.0 (0x4300) it reads as 128 + code + 8, exactly
        c16 = c.astype(jnp.int16)
        lo = _int4_to_bf16(c16 & jnp.int16(0xF))
        hi = _int4_to_bf16(lax.shift_right_arithmetic(c16, jnp.int16(4)) & jnp.int16(0xF))
        if interpret:
            wd_s[: tk // 2, :] = lo
            wd_s[tk // 2 :, :] = hi
        else:
            wd_s[:, : tk // 2] = lo
            wd_s[:, tk // 2 :] = hi

    def body(x_g, c_g, s_g, b_g, o_g, wd_s, o_s):
        mi = lax.axis_index("m")
        ni = lax.axis_index("n")
        k0 = lax.axis_index("k") * k_steps if splits > 1 else 0  # this CTA's first K step
        specs = [
            plgpu.BlockSpec((tm, tk), lambda kk: (mi, k0 + kk), transforms=x_tr),
            plgpu.BlockSpec((tn, kc), lambda kk: (ni, k0 + kk), transforms=c_tr),
        ]

        def mma(acc, x_s, c_s):
            dequant_to_smem(c_s, wd_s)
            plgpu.commit_smem()
            plgpu.wgmma(acc, x_s, rhs_kmajor(wd_s, interpret))
            plgpu.wgmma_wait(0)

        if groups == 1:
            def scope(acc):
                plgpu.emit_pipeline(lambda _, x_s, c_s: mma(acc, x_s, c_s), grid=(k_steps,), in_specs=specs,
                                    max_concurrent_steps=config.stages)(x_g, c_g)
                return acc[...]

            y = pl.run_scoped(scope, plgpu.ACC(tile, jnp.float32))
            y = y * bcast_vec(s_g.at[0], ni * tn, tile, 1, interpret)
        else:
            def group_step(idx, x_s, c_s, carry):
                (kk,) = idx

                def part_scope(acc):
                    mma(acc, x_s, c_s)
                    return acc[...]

                part = pl.run_scoped(part_scope, plgpu.ACC(tile, jnp.float32))
                g = (k0 + kk) // steps_per_group
                return carry + part * bcast_vec(s_g.at[g], ni * tn, tile, 1, interpret)

            y = plgpu.emit_pipeline(group_step, grid=(k_steps,), in_specs=specs, max_concurrent_steps=config.stages,
                                    init_carry=zeros_carry(tile, interpret))(x_g, c_g)
        if splits > 1:  # a float32 partial product; the bias is added once, after the sum
            store_tile(y, o_s, o_g.at[lax.axis_index("k")], mi, ni)
            return
        y = y + bcast_vec(b_g, ni * tn, tile, 1, interpret)
        store_tile(y, o_s, o_g, mi, ni)

    d_tr = smem_transforms(wd_shape[1], jnp.bfloat16, interpret)
    scratch = [plgpu.SMEM(wd_shape, jnp.bfloat16, transforms=d_tr)]
    if splits == 1:
        return tiled_kernel(body, m, n, tm, tn, out_dtype, scratch, interpret)(x, codes, scale.T, b)
    parts = tiled_kernel(body, m, n, tm, tn, jnp.float32, scratch, interpret, splits=splits)(x, codes, scale.T, b)
    return (parts.sum(axis=0) + b).astype(out_dtype)


__all__ = ["Config", "weight_only_matmul_gpu"]
