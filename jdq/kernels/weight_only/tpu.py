"""Weight-only W8A16 / W4A16 GEMM as a Pallas TPU kernel: integer weights dequantized in VMEM.

Computes :func:`jdq.kernels.weight_only.ref.weight_only_matmul`: ``x`` (M, K) in bf16 or f32,
codes int8 (N, K) (``bits=8``) or int4 packed int8 (N, K/2) in the layout of
:func:`~jdq.kernels.weight_only.ref.pack_int4` (``bits=4``), float32 scales (N, G).

Grid (M/tm, N/tn, K/tk), K innermost ("arbitrary"), a float32 VMEM accumulator. Per K step the
code tile is sign-extended (int4: :func:`unpack_int4_tile`, two 32-bit shifts, a 64-lane rotation
and a select per 128 packed lanes) and converted to the dot's operand type: bf16 for bf16 ``x``
(every code is exact in bf16, every bf16 × bf16 product exact in the float32 accumulator: one
native MXU pass), float32 at ``Precision.HIGHEST`` for any other ``x``. Scales are not applied to
the weight tile but to the accumulated products, as the GPU kernel does; each step's scale rows
arrive as their own (r, tn) block (:func:`group_scales`):

* per channel (``G == 1``): one accumulator over all of K, times the scale in the epilogue;
* ``group_size`` dividing ``tk``: one dot per group inside the step, each added times its scale;
* ``tk`` dividing ``group_size``: a second accumulator collects the group over its K steps and is
  added, times the group's scale, at the group's last step.

The epilogue adds the bias and casts. **Equality with the reference**: not bit-exact in general.
The reference rounds ``code · scale`` to float32 and sums the products in XLA's order; the kernel
sums ``x · code`` per group and multiplies by the scale afterwards, in tile order. Both are float32
dot products of the same real numbers, each within ``γ_{K+2} = (K+2)·2⁻²⁴/(1 − (K+2)·2⁻²⁴)`` times
``Σ_k |x_k| |Ŵ_nk| + |b_n|`` of the exact value, so they differ by at most twice that before the
output cast (one more output ulp after a cast to bf16). They agree bit for bit when all of that
arithmetic is exact (``x`` and the scales on coarse power-of-two grids; tested).

No TPU was available: tested in Pallas TPU interpret mode on CPU, and the Pallas -> Mosaic TPU
lowering (which enforces the block rule below) runs on CPU; what the Mosaic compiler in libtpu then
accepts is unverified. On a TPU, blocks need their last two dims to be multiples of (8, 128) or the
whole dim: ``tn % 128 == 0``, ``tk % 128 == 0`` (int8) and ``tk % 256 == 0`` (int4, the packed
block is ``tk/2`` wide) unless ``tk == K``. Two spots are likely unsupported there: the 64-lane
concatenation of an int4 step whose ``tk/2`` is an odd multiple of 64 (e.g. K = 1152, whose only
legal int4 tile is ``tk = K``), and the 64-lane slices of ``group_size = 64``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jdq.kernels._tpu import tiled_gemm_call

from jdq.kernels.weight_only.ref import PACK_BLOCK

_HALF = PACK_BLOCK // 2
_DIMS = (((1,), (1,)), ((), ()))  # contract the last dims: x (tm, tk) · w (tn, tk)ᵀ


def unpack_int4_tile(p):
    """Packed int8 tile (tn, tk/2) -> int32 codes (tn, tk) in feature order (``pack_int4`` layout).

    Each 128 packed lanes hold two pack blocks (bytes of block ``2c`` in lanes < 64, of ``2c + 1``
    above); after the two shifts, a lane rotation by 64 and a select put each block's low and high
    halves side by side, on whole 128-lane vectors. A trailing single block (``tk/2`` an odd
    multiple of 64) is joined by a 64-lane concatenation instead.
    """
    w = p.astype(jnp.int32)  # sign-extends the byte; shifts run on 32-bit lanes
    lo = lax.shift_right_arithmetic(lax.shift_left(w, 28), 28)
    hi = lax.shift_right_arithmetic(w, 4)
    rows, kh = p.shape
    parts = []
    if kh >= 2 * _HALF:
        first = lax.broadcasted_iota(jnp.int32, (rows, 2 * _HALF), 1) < _HALF
    for c in range(kh // (2 * _HALF)):
        sl = slice(c * 2 * _HALF, (c + 1) * 2 * _HALF)
        l, h = lo[:, sl], hi[:, sl]
        parts += [jnp.where(first, l, pltpu.roll(h, _HALF, 1)), jnp.where(first, pltpu.roll(l, _HALF, 1), h)]
    if kh % (2 * _HALF):
        parts += [lo[:, kh - _HALF:], hi[:, kh - _HALF:]]
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


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


def group_scales(scale, n, groups, group_size, tk, tn):
    """Scales (N, G) as (G/r, r, N), r groups per K step, and the BlockSpec that brings step ``kk``'s (r, tn) block.

    A group spanning several steps (``group_size > tk``) gives r = 1 and the same block for all of its steps.
    The block index moves with ``kk``, so no row is picked by a dynamic sublane index in the kernel.
    """
    per_step = max(1, tk // group_size)
    steps = max(1, group_size // tk)
    s = scale.reshape(n, groups).T.reshape(groups // per_step, per_step, n)
    return s, pl.BlockSpec((pl.Squeezed(), per_step, tn), lambda i, j, kk: (lax.div(kk, steps), 0, j))


def accumulate_groups(acc_ref, part, dot, x, w, scale, kk, tk: int, group_size: int):
    """Add this K step's group partials ``dot(x, w)``, each times its ``scale(r)``, to the float32 ``acc_ref`` in group order.

    Several groups per step: one dot per group. One group over several steps: the partial sums in
    ``part[0]`` (zeroed at the group's first step) and is rescaled at its last.
    """
    if tk % group_size == 0:
        for j in range(tk // group_size):  # group order, one float32 rounding per group as in the references
            sl = slice(j * group_size, (j + 1) * group_size)
            acc_ref[...] += dot(x[:, sl], w[:, sl]).astype(jnp.float32) * scale(j)
        return
    (part_ref,) = part
    steps = group_size // tk

    @pl.when(lax.rem(kk, steps) == 0)
    def _():
        part_ref[...] = jnp.zeros_like(part_ref)

    part_ref[...] += dot(x, w)

    @pl.when(lax.rem(kk, steps) == steps - 1)
    def _():
        acc_ref[...] += part_ref[...].astype(jnp.float32) * scale(0)


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

    def scale(r):  # (1, tn) scales of this step's r-th group
        return s_ref[r:r + 1, :]

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    if groups == 1:
        acc_ref[...] += dot(x, w)
    else:
        accumulate_groups(acc_ref, part, dot, x, w, scale, kk, tk, group_size)

    @pl.when(kk == k_steps - 1)
    def _():
        y = acc_ref[...]
        if groups == 1:
            y = y * scale(0)
        if has_bias:
            y = y + b_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


# jitted like the other kernel entry points: identical calls in a model lower once.
@functools.partial(jax.jit, static_argnames=("bits", "group_size", "out_dtype", "tm", "tn", "tk", "interpret"))
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
    scales, scale_spec = group_scales(scale, n, groups, group_size, tk, tn)
    operands = [x, codes, scales]
    in_specs = [
        pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)),
        pl.BlockSpec((tn, kc), lambda i, j, kk: (j, kk)),
        scale_spec,
    ]
    if b is not None:
        operands.append(jnp.asarray(b, jnp.float32).reshape(1, n))
        in_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
    scratch = [pltpu.VMEM((tm, tn), jnp.float32)]
    if groups > 1 and group_size > tk:
        scratch.append(pltpu.VMEM((tm, tn), jnp.float32))
    kernel = functools.partial(_kernel, bits=bits, group_size=group_size, tk=tk, k_steps=k_steps, groups=groups,
                               has_bias=b is not None, precision=precision)
    return tiled_gemm_call(kernel, m, n, tm, tn, k_steps, in_specs, scratch, out_dtype,
                           interpret)(*operands)


__all__ = ["weight_only_matmul_tpu", "unpack_int4_tile", "check_tiles", "group_scales", "accumulate_groups"]
