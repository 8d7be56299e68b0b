"""The MX op: MXFP8 (E4M3) / MXINT8 block-scaled GEMM, both operands in one format, blocks of 32 along K.

Kinds ``mxfp8`` (``codes`` (N, K) E4M3) and ``mxint8`` (``codes`` (N, K) int8), ``scale``
(K/32, N) uint8 E8M0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdq.kernels.op import KernelOp, LoweredWeight, dispatch, pad_rows, single_casts, tpu_tiles

#: Lowered kind -> the jdq.formats name of both operands.
MX_FORMAT = {"mxfp8": "mxfp8_e4m3", "mxint8": "mxint8"}


def supports(w, a):
    """``("mxfp8" | "mxint8", why)`` when weight and activation are the same MXFP8 E4M3 / MXINT8 cast (block 32)."""
    if not single_casts(w, a) or getattr(w.spec, "kind", None) != "mx":
        return None, None
    spec = w.spec
    if a is None or a.spec != spec:
        return None, f"MX weight {w.fmt} needs the same MX format on the activation"
    if spec.name not in MX_FORMAT.values() or spec.block_size != 32 or spec.rounding != "even":
        return None, f"MX format {spec.name} (block {spec.block_size}) has no kernel (mxfp8_e4m3 / mxint8, block 32)"
    return ("mxfp8" if spec.name == "mxfp8_e4m3" else "mxint8"), "MX block-scaled"


def pack(w, kind, w_op, a_op):
    """``(LoweredWeight, dequantized (K, N))`` of a (K, N) weight, or ``(None, reason)``."""
    from jdq import formats

    k, n = w.shape
    if k % 32:
        return None, f"K={k} is not a multiple of the MX block 32"
    qt = formats.quantize(w, w_op.spec, axis=-2)
    codes = qt.codes.T if kind == "mxint8" else jax.lax.bitcast_convert_type(qt.codes.T, jnp.float8_e4m3fn)
    return LoweredWeight(codes, qt.scale, kind, k, n, None), formats.dequantize(qt, jnp.float32)


def _gpu(xq, xs, lw, ws, b, out_dtype, *, impl, config):
    from jdq.kernels import tuning
    from jdq.kernels.mx.gpu import Config, mx_matmul_gpu

    cfg = config or Config(**tuning.lookup("mx", xq.shape[0]))
    if not cfg.supports(cfg.tile_m, lw.n, lw.k):
        return None
    xq_p, m0 = pad_rows(xq, cfg.tile_m)
    xs_p, _ = pad_rows(xs.T, cfg.tile_m)
    out = mx_matmul_gpu(xq_p, xs_p.T, lw.codes, ws, b, out_dtype, cfg, interpret=impl == "gpu_interpret")
    return out[:m0]


def _tpu(xq, xs, lw, ws, b, out_dtype, *, impl, config):
    from jdq.kernels.mx.tpu import mx_matmul_tpu

    tiles = tpu_tiles(xq.shape[0], lw.n, lw.k, k_multiple=32)
    xq_p, m0 = pad_rows(xq, tiles["tm"])
    xs_p, _ = pad_rows(xs.T, tiles["tm"])
    out = mx_matmul_tpu(xq_p, xs_p.T, lw.codes, ws, b, out_dtype, interpret=impl == "tpu_interpret", **tiles)
    return out[:m0]


def _xla(xq, xs, lw, ws, b, out_dtype, *, impl, config):
    from jdq.kernels.mx import ref

    return ref.mx_matmul(xq, xs, lw.codes, ws, b, out_dtype)


IMPLEMENTATIONS = {"gpu": _gpu, "tpu": _tpu, "xla": _xla}


def mx_matmul(x, lw: LoweredWeight, b, out_dtype, impl: str = "auto", config=None):
    """MX-quantize ``x`` (M, K) along K and run the block-scaled GEMM (:mod:`jdq.kernels.mx`)."""
    from jdq.kernels.mx import ref

    fmt = MX_FORMAT[lw.kind]
    xq, xs = ref.quantize_operand(x, fmt)
    ws = ref.block_scales(lw.scale, fmt)
    return dispatch(IMPLEMENTATIONS, impl, xq, xs, lw, ws, b, out_dtype, config=config)


def linear(x, lw: LoweredWeight, bias, out_dtype, impl):
    """``x`` (M, K) quantized per block of 32 in the weight's MX format, times the packed weight."""
    return mx_matmul(x, lw, bias, out_dtype, impl)


OP = KernelOp("mx", tuple(MX_FORMAT), supports, pack, linear, IMPLEMENTATIONS)
