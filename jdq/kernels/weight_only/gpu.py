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

``Config.kind="rega"`` is a second kernel (:func:`_rega_matmul`): the dequantized weight goes from
registers straight into the WGMMA as its A operand (yᵀ = Ŵ · xᵀ), the group scales applied before
the bf16 rounding; faster for W4A16 at M = 1024 and on DiT's fc1 / fc2 at M = 256 (the H200
tuning rows pick it there; ``jdq/kernels/NOTES.md``, "Fourth round").

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

from jdq.kernels._mgpu import (bcast_vec, kmajor_operand, kmajor_spec, pl, plgpu, rhs_kmajor, smem_transforms, store_tile,
                               tiled_kernel, wgmma_register_a, zeros_carry)


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of the weight-only GPU kernel."""

    tile_m: int = 64
    tile_n: int = 128
    tile_k: int = 128
    stages: int = 4
    split_k: int = 1  # K ranges run by separate CTAs; their float32 partial products are summed after
    kind: str = "smem"  # "smem": dequantized tile via shared memory; "rega": WGMMA A operand from registers

    def supports(self, n: int, k: int, group_size: int, bits: int) -> bool:
        """Whether N, K and the group size fit this config's tiles."""
        rega_ok = self.kind != "rega" or (self.tile_n % 64 == 0 and self.tile_m <= 256 and self.tile_m % 64 == 0)
        return (n % self.tile_n == 0 and k % (self.tile_k * self.split_k) == 0 and group_size % self.tile_k == 0
                and (bits == 8 or self.tile_k == 128) and rega_ok)

    def smem_bytes(self, bits: int, out_itemsize: int = 2) -> int:
        """Shared memory of the buffers: ``stages`` x and code tiles, the dequantized tile, the output tile."""
        kc = self.tile_k if bits == 8 else self.tile_k // 2
        out_itemsize = 4 if self.split_k > 1 else out_itemsize  # split-K stages float32 partials
        dequant = 0 if self.kind == "rega" else self.tile_n * self.tile_k * 2
        scales = self.stages * self.tile_n * 4 if self.kind == "rega" else 0
        return (self.stages * (self.tile_m * self.tile_k * 2 + self.tile_n * kc) + dequant + scales
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
    if config.kind not in ("smem", "rega"):
        raise ValueError(f"weight-only GPU config.kind must be 'smem' or 'rega', got {config.kind!r}")
    m, k = x.shape
    n = codes.shape[0]
    tm, tn, tk = config.tile_m, config.tile_n, config.tile_k
    if bits not in (4, 8):
        raise ValueError(f"weight-only GPU kernel: bits must be 4 or 8, got {bits}")
    kc = tk if bits == 8 else tk // 2
    if codes.shape != (n, k if bits == 8 else k // 2):
        raise ValueError(f"weight-only: codes shape {codes.shape} does not fit x {x.shape} with bits={bits}")
    if m % tm or not config.supports(n, k, group_size, bits):
        hint = " (rega: tile_n a multiple of 64, tile_m of 64 up to 256)" if config.kind == "rega" else ""
        raise ValueError(f"weight-only: M={m} N={n} K={k} group_size={group_size} do not fit {config}{hint}")
    groups = k // group_size
    scale = jnp.asarray(scale, jnp.float32).reshape(n, groups)
    b = jnp.zeros((n,), jnp.float32) if b is None else jnp.asarray(b, jnp.float32)
    x = x.astype(jnp.bfloat16)
    out_dtype = jnp.dtype(out_dtype)
    if config.kind == "rega":
        return _rega_matmul(x, codes, scale, b, bits, group_size, out_dtype, config, interpret)
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


def _rega_matmul(x, codes, scale, b, bits, group_size, out_dtype, config, interpret):
    """``kind="rega"``: yᵀ = Ŵ · xᵀ with the dequantized weight tile as WGMMA's A operand in registers.

    No shared-memory round trip for the dequantized tile (JAX's ``hopper_mixed_type_matmul_mgpu``
    structure): per K step the code tile (tile_n, K step) goes shared -> registers -> bf16 (group
    scales applied there, in float32, then rounded to bf16: the bf16 weight a bf16 fake-quant model
    multiplies by) and WGMMA multiplies it by the x tile read K-major from shared memory. The
    accumulator is the (tile_n, tile_m) tile of yᵀ: per-channel scales and the bias are applied to
    its rows; the (N, M) result is transposed by XLA (small at the batch sizes this kind is for).
    Warpgroup lowering semantics (register layouts inferred). Operands as checked and normalised by
    :func:`weight_only_matmul_gpu` (x bf16, scale (N, G) float32, b (N,) float32).
    """
    m, k = x.shape
    n = codes.shape[0]
    tm, tn, tk = config.tile_m, config.tile_n, config.tile_k
    kc = tk if bits == 8 else tk // 2
    groups = k // group_size
    splits = config.split_k
    k_steps = k // tk // splits
    steps_per_group = group_size // tk
    half = tk // 2

    def body(c_g, x_g, s_g, sc_g, b_g, o_g, *scratch):
        *a_scratch, o_s = scratch
        ni = lax.axis_index("m")  # the output is yᵀ (N, M): grid axis "m" walks N tiles, "n" walks M tiles
        mi = lax.axis_index("n")
        k0 = lax.axis_index("k") * k_steps if splits > 1 else 0
        specs = [
            plgpu.BlockSpec((tn, kc), lambda kk: (ni, k0 + kk), transforms=smem_transforms(kc, jnp.int8, interpret)),
            kmajor_spec(tm, tk, lambda kk: (mi, k0 + kk), smem_transforms(tk, jnp.bfloat16, interpret), interpret),
            plgpu.BlockSpec((1, tn), lambda kk: ((k0 + kk) // steps_per_group, ni)),
        ]

        def weight(c, s_s):
            if groups == 1:
                return c.astype(jnp.bfloat16)  # exact; the per-channel scale is applied to the accumulator
            s = lax.broadcast_in_dim(s_s[0, :], c.shape, [0])
            return (c.astype(jnp.float32) * s).astype(jnp.bfloat16)

        def mma(acc, a, x_view):
            wgmma_register_a(acc, a, x_view, a_scratch[0] if interpret else None, interpret)

        def step(_, c_s, x_s, s_s, acc):
            c = c_s[...]
            if bits == 8:
                mma(acc, weight(c, s_s), x_s)
            else:
                c16 = c.astype(jnp.int16)
                lo = (c16 << jnp.int16(12)) >> jnp.int16(12)
                hi = c16 >> jnp.int16(4)
                xs_lo, xs_hi = (x_s.at[:half], x_s.at[half:]) if interpret else (x_s.at[:, :half], x_s.at[:, half:])
                mma(acc, weight(lo, s_s), xs_lo)
                mma(acc, weight(hi, s_s), xs_hi)
            # wait(0): a WGMMA still reading its register A operand while the next tile is dequantized
            # gave wrong W8A16 results on the H200 (wgmma_wait(1), kernels_device_run14.md checks)
            plgpu.wgmma_wait(0)
            return acc

        def scope(acc):
            plgpu.emit_pipeline(step, grid=(k_steps,), in_specs=specs, max_concurrent_steps=config.stages,
                                init_carry=acc)(c_g, x_g, sc_g)
            return acc[...]

        y = pl.run_scoped(scope, plgpu.ACC((tn, tm), jnp.float32))
        if groups == 1:
            y = y * bcast_vec(s_g, ni * tn, (tn, tm), 0, interpret)
        if splits > 1:
            store_tile(y, o_s, o_g.at[lax.axis_index("k")], ni, mi)
            return
        y = y + bcast_vec(b_g, ni * tn, (tn, tm), 0, interpret)
        store_tile(y, o_s, o_g, ni, mi)

    args = (codes, kmajor_operand(x, interpret), scale[:, 0], scale.T, b)
    scratch = [plgpu.SMEM((tn, kc), jnp.bfloat16)] if interpret else []
    out_t = tiled_kernel(body, n, m, tn, tm, jnp.float32 if splits > 1 else out_dtype, scratch, interpret,
                         splits=splits, warpgroup_semantics=True)(*args)
    if splits > 1:
        return (out_t.sum(axis=0).T + b).astype(out_dtype)
    return out_t.T


__all__ = ["Config", "weight_only_matmul_gpu"]
