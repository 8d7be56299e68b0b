"""Weight-only W8A16 / W4A16 GEMM as a Pallas TPU kernel: integer weights dequantized in VMEM.

Computes :func:`jdq.kernels.weight_only.ref.weight_only_matmul`: ``x`` (M, K) in bf16 or f32,
codes int8 (N, K) (``bits=8``) or int4 packed int8 (N, K/2) in the layout of
:func:`~jdq.kernels.weight_only.ref.pack_int4` (``bits=4``), float32 scales (N, G).

Grid (M/tm, N/tn, K/tk), K innermost ("arbitrary"), a float32 VMEM accumulator. Per K step the
code tile is sign-extended (int4: two int32 shifts per byte, then the two 64-wide halves of each
packed 128-block are laid side by side in feature order) and converted to the dot's operand type:
bf16 for bf16 ``x`` (every code is exact in bf16, every bf16 × bf16 product exact in the float32
accumulator: one native MXU pass), float32 at ``Precision.HIGHEST`` for any other ``x``.
Scales are not applied to the weight tile but to the accumulated products, as the GPU kernel does:

* per channel (``G == 1``): one accumulator over all of K, times the scale in the epilogue;
* ``group_size`` dividing ``tk``: one dot per group inside the step, each added times its scale;
* ``tk`` dividing ``group_size``: a second accumulator collects the group over its K steps and is
  added, times the group's scale, at the group's last step.

The epilogue adds the bias and casts. **Equality with the reference**: not bit-exact in general.
The reference rounds ``code · scale`` to float32 and sums the products in XLA's order; the kernel
sums ``x · code`` per group and multiplies by the scale afterwards, in tile order. Both are float32
dot products of the same real numbers, each within ``γ_{K+2} = (K+2)·2⁻²⁴/(1 − (K+2)·2⁻²⁴)`` times
``Σ_k |x_k| |Ŵ_nk|`` of the exact value, so they differ by at most twice that before the output
cast (one more output ulp after a cast to bf16). They agree bit for bit when all of that
arithmetic is exact (``x`` and the scales on coarse power-of-two grids; tested). No TPU was
available: tested in Pallas TPU interpret mode on CPU and cross-lowered to Mosaic TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jdq.kernels.weight_only.ref import PACK_BLOCK

_HALF = PACK_BLOCK // 2
_DIMS = (((1,), (1,)), ((), ()))  # contract the last dims: x (tm, tk) · w (tn, tk)ᵀ


def unpack_int4_tile(p):
    """Packed int8 tile (tn, tk/2) -> int32 codes (tn, tk) in feature order (``pack_int4`` layout)."""
    w = p.astype(jnp.int32)  # sign-extends the byte; shifts run on 32-bit lanes
    lo = lax.shift_right_arithmetic(lax.shift_left(w, 28), 28)
    hi = lax.shift_right_arithmetic(w, 4)
    parts = []
    for blk in range(p.shape[1] // _HALF):  # block b holds features b*128 + [0, 64) low, + [64, 128) high
        sl = slice(blk * _HALF, (blk + 1) * _HALF)
        parts += [lo[:, sl], hi[:, sl]]
    return jnp.concatenate(parts, axis=1)


def check_tiles(name, m, n, k, tm, tn, tk, group_size, bits):
    """Shrink the tiles to the shape; raise a ValueError naming M/N/K, the tiles and the group if they do not fit."""
    tm, tn, tk = min(tm, m), min(tn, n), min(tk, k)
    if m % tm or n % tn or k % tk:
        raise ValueError(f"{name} TPU kernel: M={m} N={n} K={k} do not tile by (tm, tn, tk) = ({tm}, {tn}, {tk})")
    if bits == 4 and tk % PACK_BLOCK:
        raise ValueError(f"{name} TPU kernel: tk={tk} must be a multiple of the int4 pack block {PACK_BLOCK} (K={k})")
    if tk % group_size and group_size % tk:
        raise ValueError(f"{name} TPU kernel: group_size={group_size} and tk={tk} (K={k}): one must divide the other")
    return tm, tn, tk


def _kernel(x_ref, c_ref, s_ref, *refs, bits, group_size, tk, k_steps, groups, has_bias, precision):
    if has_bias:
        b_ref, o_ref, acc_ref, *part = refs
    else:
        b_ref, (o_ref, acc_ref, *part) = None, refs
    kk = pl.program_id(2)
    x = x_ref[...]
    dt = jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32
    x = x.astype(dt)
    w = (unpack_int4_tile(c_ref[...]) if bits == 4 else c_ref[...]).astype(dt)

    def dot(xa, wa):
        return lax.dot_general(xa, wa, _DIMS, precision=precision, preferred_element_type=jnp.float32)

    def scale(g):  # (1, tn) scales of group g
        return s_ref[pl.ds(g, 1), :]

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    if groups == 1:
        acc_ref[...] += dot(x, w)
    elif tk % group_size == 0:
        per_step = tk // group_size
        for j in range(per_step):
            sl = slice(j * group_size, (j + 1) * group_size)
            acc_ref[...] += dot(x[:, sl], w[:, sl]) * scale(kk * per_step + j)
    else:
        (part_ref,) = part
        steps = group_size // tk

        @pl.when(lax.rem(kk, steps) == 0)
        def _():
            part_ref[...] = jnp.zeros_like(part_ref)

        part_ref[...] += dot(x, w)

        @pl.when(lax.rem(kk, steps) == steps - 1)
        def _():
            acc_ref[...] += part_ref[...] * scale(lax.div(kk, steps))

    @pl.when(kk == k_steps - 1)
    def _():
        y = acc_ref[...]
        if groups == 1:
            y = y * scale(0)
        if has_bias:
            y = y + b_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


def weight_only_matmul_tpu(x, codes, scale, b, bits: int, group_size: int, out_dtype=None, tm=256, tn=256, tk=512,
                           interpret=False):
    """``x (M, K) · Ŵᵀ (+ b)`` on TPU with int8 / packed-int4 codes and scales (N, G); ``out_dtype`` None: ``x.dtype``."""
    m, k = x.shape
    n = codes.shape[0]
    if bits not in (4, 8):
        raise ValueError(f"weight-only TPU kernel: bits must be 4 or 8, got {bits}")
    if codes.dtype != jnp.int8 or codes.shape != (n, k if bits == 8 else k // 2):
        raise ValueError(f"weight-only TPU kernel: codes {codes.dtype}{codes.shape} do not fit x {x.shape} "
                         f"with bits={bits} (want int8 ({n}, {k if bits == 8 else k // 2}))")
    groups = k // group_size if group_size and k % group_size == 0 else 0
    scale = jnp.asarray(scale, jnp.float32)
    if not groups or scale.size != n * groups:
        raise ValueError(f"weight-only TPU kernel: K={k}, group_size={group_size} and scale shape {scale.shape} disagree")
    tm, tn, tk = check_tiles("weight-only", m, n, k, tm, tn, tk, group_size, bits)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    kc = tk if bits == 8 else tk // 2
    k_steps = k // tk
    precision = None if x.dtype == jnp.bfloat16 else lax.Precision.HIGHEST
    operands = [x, codes, scale.reshape(n, groups).T]
    in_specs = [
        pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)),
        pl.BlockSpec((tn, kc), lambda i, j, kk: (j, kk)),
        pl.BlockSpec((groups, tn), lambda i, j, kk: (0, j)),  # all of a column block's scales stay resident
    ]
    if b is not None:
        operands.append(jnp.asarray(b, jnp.float32).reshape(1, n))
        in_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
    scratch = [pltpu.VMEM((tm, tn), jnp.float32)]
    if groups > 1 and group_size > tk:
        scratch.append(pltpu.VMEM((tm, tn), jnp.float32))
    kernel = functools.partial(_kernel, bits=bits, group_size=group_size, tk=tk, k_steps=k_steps, groups=groups,
                               has_bias=b is not None, precision=precision)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(m // tm, n // tn, k_steps),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)),
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*operands)


__all__ = ["weight_only_matmul_tpu", "unpack_int4_tile", "check_tiles"]
