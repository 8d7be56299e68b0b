"""The W4A8 op: int4 weights (two per byte, per channel or per group) × int8 per-token activations.

Kind ``w4a8``: ``codes`` (N, K/2) packed int4 (:func:`jdq.kernels.weight_only.ref.pack_int4`),
``scale`` (N, G) f32, ``group_size`` (``None``: per channel).
"""

from __future__ import annotations

from jdq.kernels.op import (
    KernelOp,
    LoweredWeight,
    dispatch,
    int_weight_reason,
    is_token_cast,
    pad_rows,
    scaled_codes,
    single_casts,
    tpu_tiles,
)
from jdq.kernels.token_quant.api import quantize_tokens


def supports(w, a):
    """``("w4a8", why)`` for int4 (per channel, groups of 64 or of a multiple of 128) × int8 per-token sites."""
    if not single_casts(w, a) or getattr(w.spec, "kind", None) != "int" or a is None or w.spec.bits != 4:
        return None, None
    if not is_token_cast(a, "int", bits=8):
        return None, None  # the int8-activation op says why
    why = int_weight_reason(w)
    if why is not None:
        return None, why
    gs = w.spec.group_size if w.spec.granularity == "group" else None
    if gs is None or gs == 64 or gs % 128 == 0:
        return "w4a8", "int8 per-token x int4 per-channel/group"
    return None, f"int4 group size {gs} has no W4A8 kernel (64 or a multiple of 128)"


def pack_int4_weight(w, kind, w_op):
    """``(LoweredWeight, dequantized)`` of an int4 weight packed two codes per byte, or ``(None, reason)``."""
    from jdq.kernels.weight_only.ref import PACK_BLOCK, pack_int4

    k, n = w.shape
    packed = scaled_codes(w, w_op.spec)
    if isinstance(packed, str):
        return None, packed
    codes, scale, group, deq = packed
    if k % PACK_BLOCK:
        return None, f"K={k} is not a multiple of {PACK_BLOCK} (int4 packing)"
    return LoweredWeight(pack_int4(codes), scale, kind, k, n, group if w_op.spec.granularity == "group" else None), deq


def pack(w, kind, w_op, a_op):
    """``(LoweredWeight, dequantized (K, N))`` of a (K, N) weight, or ``(None, reason)``."""
    return pack_int4_weight(w, kind, w_op)


def _gpu(xq, xs, lw, b, out_dtype, *, impl, config):
    from jdq.kernels import tuning
    from jdq.kernels.w4a8.gpu import Config, w4a8_matmul_gpu

    gs = lw.group_size or lw.k
    cfg = config or Config(**tuning.lookup("w4a8", xq.shape[0]))
    if not cfg.supports(cfg.tile_m, lw.n, lw.k, gs):
        return None
    xq_p, m0 = pad_rows(xq, cfg.tile_m)
    xs_p, _ = pad_rows(xs, cfg.tile_m)
    out = w4a8_matmul_gpu(xq_p, xs_p, lw.codes, lw.scale, b, gs, out_dtype, cfg, interpret=impl == "gpu_interpret")
    return out[:m0]


def _tpu(xq, xs, lw, b, out_dtype, *, impl, config):
    from jdq.kernels.w4a8.tpu import w4a8_matmul_tpu

    gs = lw.group_size or lw.k
    tiles = tpu_tiles(xq.shape[0], lw.n, lw.k, k_multiple=256, group=gs)
    (xq_p, m0), (xs_p, _) = pad_rows(xq, tiles["tm"]), pad_rows(xs, tiles["tm"])
    out = w4a8_matmul_tpu(xq_p, xs_p, lw.codes, lw.scale, b, gs, out_dtype, interpret=impl == "tpu_interpret", **tiles)
    return out[:m0]


def _xla(xq, xs, lw, b, out_dtype, *, impl, config):
    from jdq.kernels.w4a8 import ref

    return ref.w4a8_matmul(xq, xs, lw.codes, lw.scale, b, lw.group_size or lw.k, out_dtype)


IMPLEMENTATIONS = {"gpu": _gpu, "tpu": _tpu, "xla": _xla}


def w4a8_matmul(xq, xs, lw: LoweredWeight, b, out_dtype, impl: str = "auto", config=None):
    """The W4A8 GEMM (int8 activation codes, packed int4 weight) on the implementation ``impl`` selects."""
    return dispatch(IMPLEMENTATIONS, impl, xq, xs, lw, b, out_dtype, config=config)


def linear(x, lw: LoweredWeight, bias, out_dtype, impl):
    """``x`` (M, K) quantized per token to int8, times the packed int4 weight."""
    xq, xs = quantize_tokens(x, "int8", impl)
    return w4a8_matmul(xq, xs, lw, bias, out_dtype, impl)


OP = KernelOp("w4a8", ("w4a8",), supports, pack, linear, IMPLEMENTATIONS)
