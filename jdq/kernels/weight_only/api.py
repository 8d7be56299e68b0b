"""The weight-only op: W8A16 / W4A16, int weights (per channel or group) × bf16 / f32 activations.

Kinds ``w8a16`` (``codes`` (N, K) int8) and ``w4a16`` (``codes`` (N, K/2), 4-bit codes packed
two per byte), ``scale`` (N, G) f32 with ``G`` groups of ``group_size`` along K (``G = 1``: per
channel).
"""

from __future__ import annotations

import dataclasses

from jdq.kernels.op import KernelOp, LoweredWeight, dispatch, int_weight_reason, pad_rows, scaled_codes, single_casts, tpu_tiles


def supports(w, a):
    """``("w8a16" | "w4a16", why)`` for a symmetric int8 / int4 weight whose activation stays in float."""
    if not single_casts(w, a) or getattr(w.spec, "kind", None) != "int" or a is not None:
        return None, None
    why = int_weight_reason(w)
    if why is not None:
        return None, why
    return ("w8a16" if w.spec.bits == 8 else "w4a16"), "weight-only"


def pack(w, kind, w_op, a_op):
    """``(LoweredWeight, dequantized (K, N))`` of a (K, N) weight, or ``(None, reason)``."""
    if kind == "w4a16":
        from jdq.kernels.w4a8.api import pack_int4_weight

        return pack_int4_weight(w, kind, w_op)
    k, n = w.shape
    packed = scaled_codes(w, w_op.spec)
    if isinstance(packed, str):
        return None, packed
    codes, scale, group, deq = packed
    return LoweredWeight(codes, scale, "w8a16", k, n, group), deq


def _bits(lw) -> int:
    return 4 if lw.kind == "w4a16" else 8


def _gpu(x, lw, b, out_dtype, *, impl, config):
    from jdq.kernels import tuning
    from jdq.kernels.weight_only.gpu import Config, weight_only_matmul_gpu

    bits = _bits(lw)
    cfg = config or Config(**tuning.lookup("weight_only", x.shape[0], n=lw.n, k=lw.k))
    if cfg.split_k > 1 and not cfg.supports(lw.n, lw.k, lw.group_size or lw.k, bits):
        cfg = dataclasses.replace(cfg, split_k=1)  # a tuned split that does not divide this K
    if not cfg.supports(lw.n, lw.k, lw.group_size or lw.k, bits):
        return None
    x_p, m0 = pad_rows(x, cfg.tile_m)
    out = weight_only_matmul_gpu(x_p, lw.codes, lw.scale, b, bits, lw.group_size or lw.k, out_dtype, cfg,
                                 interpret=impl == "gpu_interpret")
    return out[:m0]


def _tpu(x, lw, b, out_dtype, *, impl, config):
    from jdq.kernels.weight_only.tpu import weight_only_matmul_tpu

    bits = _bits(lw)
    gs = lw.group_size or lw.k
    tiles = tpu_tiles(x.shape[0], lw.n, lw.k, k_multiple=256 if bits == 4 else 128, group=gs)
    x_p, m0 = pad_rows(x, tiles["tm"])
    out = weight_only_matmul_tpu(x_p, lw.codes, lw.scale, b, bits, gs, out_dtype, interpret=impl == "tpu_interpret",
                                 **tiles)
    return out[:m0]


def _xla(x, lw, b, out_dtype, *, impl, config):
    from jdq.kernels.weight_only import ref

    return ref.weight_only_matmul(x, lw.codes, lw.scale, b, _bits(lw), lw.group_size or lw.k, out_dtype)


IMPLEMENTATIONS = {"gpu": _gpu, "tpu": _tpu, "xla": _xla}


def weight_only_matmul(x, lw: LoweredWeight, b, out_dtype, impl: str = "auto", config=None):
    """A W8A16 / W4A16 GEMM on the implementation ``impl`` selects (XLA reference where no kernel fits)."""
    return dispatch(IMPLEMENTATIONS, impl, x, lw, b, out_dtype, config=config)


def linear(x, lw: LoweredWeight, bias, out_dtype, impl):
    """``x`` (M, K) in float times the packed weight."""
    return weight_only_matmul(x, lw, bias, out_dtype, impl)


OP = KernelOp("weight_only", ("w8a16", "w4a16"), supports, pack, linear, IMPLEMENTATIONS)
