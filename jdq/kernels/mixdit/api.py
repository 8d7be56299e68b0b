"""The MixDiT op: the activation's outlier channels in MX9 and the rest in MX6, one GEMM.

Kind ``mixdit``: ``codes`` (N, K_lo) E4M3 (the weight's MX6 part re-encoded with one power-of-two
scale per output channel), ``scale`` (N,), ``aux`` {``w_hi`` (N, K_hi) bf16, ``perm`` (K,)
int32: the kernel's channel order}, ``meta`` ``k_hi`` (outlier channels), ``hi`` / ``lo`` (the
activation's formats). Sites pair :func:`jdq.quant.outlier_split` (``granularity="channel"``,
MX9 / MX6) on the activation with :func:`jdq.quant.outlier_weight` of an MX6 cast on the weight.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdq.kernels.op import KernelOp, LoweredWeight, dispatch, pad_rows, tpu_tiles


def supports(w, a):
    """``("mixdit", why)`` for an outlier-weight / channel outlier-split pair in MX9 / MX6 (SMX blocks of 16)."""
    if w.outliers is None or not w.outliers.weight:
        return None, None
    if a is None or a.stages != ("outlier_split",):
        return None, "weight is an outlier_weight but the activation is not an outlier_split"
    if w.stages != ("outlier_weight", "cast"):
        return None, "outlier_weight must wrap a single format cast"
    ao, wo = a.outliers, w.outliers
    if ao.granularity != "channel":
        return None, f"outlier split granularity {ao.granularity!r} has no kernel (needs 'channel')"
    names = (ao.hi.name, ao.lo.name, w.spec.name)
    if names != ("mx9", "mx6", "mx6"):
        return None, f"outlier formats hi/lo/weight {names} have no kernel (needs mx9/mx6/mx6)"
    if any((s.block_size, s.sub_block_size) != (16, 2) for s in (ao.hi, ao.lo, w.spec)):
        return None, "MixDiT kernel needs SMX blocks of 16 with micro-exponent pairs"
    if ao.channel_multiple != wo.channel_multiple or ao.channel_multiple % 16:
        return None, "activation and weight channel multiples differ (or are not multiples of 16)"
    return "mixdit", "MX9 outlier channels + MX6 (FP8 tensor cores)"


def pack(w, kind, w_op, a_op):
    """Kernel-order permutation, outlier count, bf16 hi / E4M3 lo parts: ``(LoweredWeight, dequantized)`` or ``(None, reason)``.

    ``w_op`` / ``a_op`` must be read with the plan state (their outlier ratios and channel ranks).
    """
    from jdq.kernels.mixdit.ref import pack_weight
    from jdq.quant.outliers import channel_permutation, outlier_count

    wo, ao = w_op.outliers, a_op.outliers
    if wo.ratio_per_group or ao.ratio_per_group:
        return None, "outlier ratio has a step axis (time groups): the kernel takes one permutation per site"
    if float(wo.ratio) != float(ao.ratio) or not bool(jnp.all(wo.rank == ao.rank)):
        return None, "activation and weight outlier states differ (ratio or channel ranks): link their statistics"
    k, n = w.shape
    perm = channel_permutation({"ratio": wo.ratio, "rank": wo.rank}, wo.channel_multiple)
    k_hi = int(outlier_count(wo.ratio, k, wo.channel_multiple))
    w_hi, w_lo, s_w, deq = pack_weight(w, perm, k_hi, w_op.spec)
    lw = LoweredWeight(w_lo, s_w, "mixdit", k, n, None, {"w_hi": w_hi, "perm": perm.astype(jnp.int32)},
                       (("k_hi", k_hi), ("hi", ao.hi), ("lo", ao.lo)))
    return lw, deq


def _gpu(x_hi, x_lo, s_x, lw, b, out_dtype, *, impl, config):
    from jdq.kernels import tuning
    from jdq.kernels.mixdit.gpu import Config, mixdit_matmul_gpu

    cfg = config or Config(**tuning.lookup("mixdit", x_hi.shape[0]))
    if not cfg.supports(cfg.tile_m, lw.n):
        return None
    (xh, m0), (xl, _), (sx, _) = (pad_rows(a, cfg.tile_m) for a in (x_hi, x_lo, s_x))
    out = mixdit_matmul_gpu(xh, xl, sx, lw.aux["w_hi"], lw.codes, lw.scale, b, out_dtype, cfg,
                            interpret=impl == "gpu_interpret")
    return out[:m0]


def _tpu(x_hi, x_lo, s_x, lw, b, out_dtype, *, impl, config):
    from jdq.kernels.mixdit.tpu import mixdit_matmul_tpu

    tiles = tpu_tiles(x_hi.shape[0], lw.n, x_lo.shape[1])
    (xh, m0), (xl, _), (sx, _) = (pad_rows(a, tiles["tm"]) for a in (x_hi, x_lo, s_x))
    out = mixdit_matmul_tpu(xh, xl, sx, lw.aux["w_hi"], lw.codes, lw.scale, b, out_dtype, tm=tiles["tm"],
                            tn=tiles["tn"], tk_lo=tiles["tk"], interpret=impl == "tpu_interpret")
    return out[:m0]


def _xla(x_hi, x_lo, s_x, lw, b, out_dtype, *, impl, config):
    from jdq.kernels.mixdit import ref

    return ref.mixdit_matmul(x_hi, x_lo, s_x, lw.aux["w_hi"], lw.codes, lw.scale, b, out_dtype)


IMPLEMENTATIONS = {"gpu": _gpu, "tpu": _tpu, "xla": _xla}


#: ``split`` values of :func:`quantize_activation`: ``"auto"`` (the one-pass kernel where ``impl`` runs the
#: GPU kernels, ``"gpu"`` / ``"gpu_interpret"``, and it applies; XLA elsewhere), ``"kernel"`` (the kernel, an
#: error where it does not apply), ``"xla"`` (:func:`jdq.kernels.mixdit.ref.quantize_activation`).
SPLITS = ("auto", "kernel", "xla")


def quantize_activation(x, lw: LoweredWeight, impl: str = "auto", split: str = "auto", config=None):
    """The GEMM's activation operands ``(x_hi, x_lo, s_x)`` of ``x`` (M, K): one-pass kernel or XLA, by ``split``."""
    from jdq.kernels import tuning
    from jdq.kernels.mixdit import ref, split_gpu
    from jdq.kernels.op import resolve_impl

    if split not in SPLITS:
        raise ValueError(f"mixdit: split must be one of {SPLITS}, got {split!r}")
    k_hi, hi, lo = lw.get_meta("k_hi"), lw.get_meta("hi"), lw.get_meta("lo")
    impl = resolve_impl(impl)
    if split == "kernel" or (split == "auto" and impl in ("gpu", "gpu_interpret")):
        cfg = config or split_gpu.SplitConfig(**tuning.lookup("mixdit_split", x.shape[0]))
        why = split_gpu.supports(x.shape, x.dtype, k_hi, hi, lo, cfg)
        if why is None:
            tbl = split_gpu.gather_table(lw.aux["perm"], k_hi)
            return split_gpu.split_activation_gpu(x, tbl, k_hi, cfg, interpret=impl == "gpu_interpret")
        if split == "kernel":
            raise ValueError(f"mixdit: the split kernel does not apply: {why}")
    return ref.quantize_activation(x, lw.aux["perm"], k_hi, hi, lo)


def mixdit_matmul(x, lw: LoweredWeight, b, out_dtype, impl: str = "auto", config=None, split: str = "auto"):
    """Quantize ``x`` (M, K) the MixDiT way (:func:`quantize_activation`) and run the mixed GEMM ``impl`` selects."""
    x_hi, x_lo, s_x = quantize_activation(x, lw, impl, split)
    return dispatch(IMPLEMENTATIONS, impl, x_hi, x_lo, s_x, lw, b, out_dtype, config=config)


def linear(x, lw: LoweredWeight, bias, out_dtype, impl):
    """``x`` (M, K) split into MX9 outlier channels and MX6 rest, times the packed weight."""
    return mixdit_matmul(x, lw, bias, out_dtype, impl)


OP = KernelOp("mixdit", ("mixdit",), supports, pack, linear, IMPLEMENTATIONS)
