"""W4A8 GEMM as a Pallas TPU kernel: int4 weights unpacked in VMEM, int8 MXU dots, group scales.

Computes :func:`jdq.kernels.w4a8.ref.w4a8_matmul`: ``xq`` (M, K) int8 with per-token scales ``xs``
(M,), weights packed (N, K/2) by :func:`~jdq.kernels.weight_only.ref.pack_int4`, float32 scales
(N, G). Grid (M/tm, N/tn, K/tk), K innermost ("arbitrary"). Per K step the packed tile is
sign-extended into int8 codes (:func:`~jdq.kernels.weight_only.tpu.unpack_int4_tile`) and
multiplied on the MXU, int8 × int8 -> int32.

Scales follow the reference's arithmetic:

* per channel (``G == 1``): one int32 accumulator over all of K; the epilogue computes
  ``float32(acc) · s_x · s_w``;
* with groups, each group's exact int32 product ``P_g`` is converted and added, times its scale,
  into a float32 accumulator in group order (``group_size`` dividing ``tk``: one dot per group in
  the step; ``tk`` dividing ``group_size``: an int32 accumulator collects the group over its steps);
  the epilogue multiplies by ``s_x``.

The bias is added last and the result cast. **Equality with the reference**: integer sums are exact
and every float operation is the reference's, in its order, at every tile size the kernel accepts
(``tk`` a multiple or a divisor of ``group_size``). What is left to the compiler is whether it
contracts a multiply and the following add (``c + float32(P_g)·s_g``, ``y·s_x + b``) into one FMA;
XLA:CPU does in jitted code (the jitted reference differs from the eager one), so the two are equal
bit for bit when those products are exact (power-of-two scales; tested at every tiling), and for
any scales per channel without a bias (no add to contract; tested); otherwise within one float32
rounding per contracted operation (tested against the bound).

No TPU was available: tested in Pallas TPU interpret mode on CPU, and the Pallas -> Mosaic TPU
lowering runs on CPU (block rules and tiles as in :mod:`jdq.kernels.weight_only.tpu`); what the
Mosaic compiler in libtpu then accepts (e.g. the int32 -> int8 truncation of the codes) is unverified.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jdq.kernels._tpu import tiled_gemm_call

from jdq.kernels.weight_only.tpu import accumulate_groups, check_tiles, group_scales, unpack_int4_tile

_DIMS = (((1,), (1,)), ((), ()))  # contract the last dims: xq (tm, tk) · w (tn, tk)ᵀ


def _kernel(xq_ref, c_ref, xs_ref, ws_ref, *refs, group_size, tk, k_steps, groups, has_bias):
    if has_bias:
        b_ref, o_ref, *scratch = refs
    else:
        b_ref, (o_ref, *scratch) = None, refs
    kk = pl.program_id(2)
    x = xq_ref[...]
    w = unpack_int4_tile(c_ref[...]).astype(jnp.int8)

    def dot(xa, wa):
        return lax.dot_general(xa, wa, _DIMS, preferred_element_type=jnp.int32)

    def scale(r):  # (1, tn) scales of this step's r-th group
        return ws_ref[r:r + 1, :]

    if groups == 1:
        (iacc_ref,) = scratch

        @pl.when(kk == 0)
        def _():
            iacc_ref[...] = jnp.zeros_like(iacc_ref)

        iacc_ref[...] += dot(x, w)
    else:
        acc_ref, *part = scratch

        @pl.when(kk == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        accumulate_groups(acc_ref, part, dot, x, w, scale, kk, tk, group_size)

    @pl.when(kk == k_steps - 1)
    def _():
        if groups == 1:
            y = scratch[0][...].astype(jnp.float32) * xs_ref[...] * scale(0)
        else:
            y = scratch[0][...] * xs_ref[...]
        if has_bias:
            y = y + b_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


# jitted like the other kernel entry points: identical calls in a model lower once.
@functools.partial(jax.jit, static_argnames=("group_size", "out_dtype", "tm", "tn", "tk", "interpret"))
def w4a8_matmul_tpu(xq, xs, codes, scale, b=None, group_size: int | None = None, out_dtype=jnp.bfloat16, tm=256,
                    tn=256, tk=512, interpret=False):
    """W4A8 GEMM ``(M, K) int8 × packed int4 (N, K/2) -> (M, N)`` on TPU; ``scale`` (N, G), ``group_size`` None: K."""
    m, k = xq.shape
    n = codes.shape[0]
    if xq.dtype != jnp.int8 or codes.dtype != jnp.int8:
        raise TypeError(f"w4a8 TPU kernel needs int8 activations and int8-packed weights, got {xq.dtype}, {codes.dtype}")
    if codes.shape != (n, k // 2):
        raise ValueError(f"w4a8 TPU kernel: packed weight {codes.shape} does not fit activation {xq.shape} "
                         f"(want ({n}, {k // 2}))")
    gs = k if group_size is None else group_size
    groups = k // gs if gs and k % gs == 0 else 0
    scale = jnp.asarray(scale, jnp.float32)
    if not groups or scale.size != n * groups:
        raise ValueError(f"w4a8 TPU kernel: scales {scale.shape} do not fit K={k} in groups of {gs}")
    if jnp.shape(xs) not in ((m,), (m, 1)):
        raise ValueError(f"w4a8 TPU kernel: xs shape {jnp.shape(xs)}, want ({m},)")
    tm, tn, tk = check_tiles("w4a8", m, n, k, tm, tn, tk, gs, 4)
    k_steps = k // tk
    scales, scale_spec = group_scales(scale, n, groups, gs, tk, tn)
    operands = [xq, codes, jnp.asarray(xs, jnp.float32).reshape(m, 1), scales]
    in_specs = [
        pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)),
        pl.BlockSpec((tn, tk // 2), lambda i, j, kk: (j, kk)),
        pl.BlockSpec((tm, 1), lambda i, j, kk: (i, 0)),
        scale_spec,
    ]
    if b is not None:
        operands.append(jnp.asarray(b, jnp.float32).reshape(1, n))
        in_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
    if groups == 1:
        scratch = [pltpu.VMEM((tm, tn), jnp.int32)]
    else:
        scratch = [pltpu.VMEM((tm, tn), jnp.float32)]
        if gs > tk:
            scratch.append(pltpu.VMEM((tm, tn), jnp.int32))
    kernel = functools.partial(_kernel, group_size=gs, tk=tk, k_steps=k_steps, groups=groups, has_bias=b is not None)
    return tiled_gemm_call(kernel, m, n, tm, tn, k_steps, in_specs, scratch, out_dtype,
                           interpret)(*operands)


__all__ = ["w4a8_matmul_tpu"]
