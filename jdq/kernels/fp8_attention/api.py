"""``fp8_attention``: E4M3 attention on the implementation ``impl`` selects, and which plans it implements.

Attention has no weight, so it is not a :class:`~jdq.kernels.op.KernelOp` of the GEMM registry
(:mod:`jdq.kernels.registry`: packed weight, ``supports(w, a)``, ``linear``); it follows
``token_quant``'s shape instead — implementations ``{"gpu", "xla"}`` behind
:func:`~jdq.kernels.op.dispatch` — plus :func:`plan_site_reason`, which tells
:func:`jdq.kernels.lower` whether a plan's attention site (``<site>.qk`` / ``<site>.pv``) is
exactly the casts this op computes (those of :func:`jdq.recipes.fp8_attention_rules`):

* ``<site>.qk`` role ``q``: a dynamic E4M3 ``granularity='row'`` cast, rounding to even;
* ``<site>.qk`` role ``k``: :func:`jdq.quant.center_tokens` then the same cast;
* ``<site>.pv`` roles ``attn_prob`` and ``v``: the same cast (per query row / per channel).

A lowered model's attention then runs :func:`fp8_attention` (``jdq.models.layers.attention``),
which differs from the fake-quant path only where the kernel's static probability scale puts a
key block on a different E4M3 grid than the plan's per-row cast (bounded in the tests; see
:mod:`jdq.kernels.fp8_attention.ref`) and by float rounding.

Cost outside the kernel (XLA, before it): one fusion per operand reads q / k / v (B, L, H, D)
and writes the codes in the kernel's layout — heads first, D zero-padded, v transposed to
(B·H, Dp, L) — plus k's mean over tokens (one more read of k). The quantization has to read the
operands anyway, so the layout change rides along in the same fusion; what it costs is the
separate pass itself. Fused into the producer it would be free: the qkv GEMM's ``split`` epilogue
(:mod:`jdq.kernels.w8a8.gpu`) already writes q, k and v as separate buffers; writing v's tile
transposed (a (tile_n, tile_m) shared-memory staging tile stored to (B·H, Dp, L)) and q / k / v as
E4M3 codes with per-token scales needs the token amax over the head's D columns inside one CTA
tile (72 of a 64- or 128-wide tile: a tile per head, D padded to the tile) and, for k, its mean
over L tokens (a cross-CTA reduction: a second light pass, or centring dropped). Not done.
After the kernel, one XLA fusion slices Dp -> D and puts the heads back after the tokens — unless
``Config.direct_out``, where the kernel stores each head's D columns into (B, Lq, H·D) itself.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jdq.kernels.fp8_attention import ref
from jdq.kernels.op import dispatch, is_token_cast


def _config(lk: int):
    from jdq.kernels import tuning
    from jdq.kernels.fp8_attention.gpu import Config

    return Config(**tuning.lookup("fp8_attention", lk))


def _gpu(ops, scale, out_dtype, b, h, d, *, impl, config=None):
    if impl not in ("gpu", "gpu_interpret"):
        return None
    from jdq.kernels.fp8_attention.gpu import fp8_attention_gpu

    qc, qs, kc, ks, vtc, vs = ops
    lq, lk, dp = qc.shape[1], kc.shape[1], qc.shape[2]
    cfg = config or _config(lk)
    pad = (-lq) % cfg.cta_rows  # extra query rows are computed and dropped (rows are independent)
    if not cfg.supports(lq + pad, lk, dp):
        return None
    if pad:
        qc = jnp.pad(qc, ((0, 0), (0, pad), (0, 0)))
        qs = jnp.pad(qs, ((0, 0), (0, pad)), constant_values=1.0)
    out = fp8_attention_gpu(qc, qs, kc, ks, vtc, vs, scale=scale, out_dtype=out_dtype, config=cfg,
                            interpret=impl == "gpu_interpret", heads=h if cfg.direct_out else None,
                            d=d if cfg.direct_out else None)
    if cfg.direct_out:  # (B, Lq, H·D) already
        return out[:, :lq].reshape(b, lq, h, d)
    return ref.unpack_output(out[:, :lq] if pad else out, b, h, d)


def _xla(ops, scale, out_dtype, b, h, d, *, impl, config=None):
    block_kv = (config or _config(ops[2].shape[1])).block_kv
    return ref.unpack_output(ref.attention_from_codes(*ops, scale, block_kv, out_dtype), b, h, d)


#: The implementations of FP8 attention (no TPU kernel: the XLA reference there).
IMPLEMENTATIONS = {"gpu": _gpu, "xla": _xla}


def fp8_attention(q, k, v, *, scale: float | None = None, impl: str = "auto", config=None, d_pad: int | None = None):
    """FP8 E4M3 attention of ``q`` (B, Lq, H, D), ``k`` / ``v`` (B, Lk, H, D): (B, Lq, H, D) in q's dtype.

    ``scale`` defaults to ``1/√D``; ``d_pad`` (default: D rounded up to a multiple of 32) is the
    padded head dim the kernel runs; ``config`` a :class:`jdq.kernels.fp8_attention.gpu.Config`
    (default from :mod:`jdq.kernels.tuning`, read here, outside the jit, so a ``JDQ_TUNING`` override
    is part of the compiled function's key). Shapes the kernel cannot tile (Lk not a multiple of
    ``block_kv``) run the XLA reference, which computes the same function.
    """
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"fp8_attention: q {q.shape} and k {k.shape} must be (B, L, H, D)")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    return _jitted(q, k, v, scale=scale, impl=impl, config=config or _config(k.shape[1]), d_pad=d_pad)


@functools.partial(jax.jit, static_argnames=("scale", "impl", "config", "d_pad"))
def _jitted(q, k, v, *, scale, impl, config, d_pad):
    b, _, h, d = q.shape
    ops = ref.quantize_operands(q, k, v, d_pad)
    return dispatch(IMPLEMENTATIONS, impl, ops, scale, jnp.dtype(q.dtype), b, h, d, config=config)


ROLES = (("qk", "q"), ("qk", "k"), ("pv", "attn_prob"), ("pv", "v"))


def plan_site_reason(operands) -> str | None:
    """``None`` when the four attention operands (``{(matmul, role): OperandPlan}``, :data:`ROLES`) are this op's casts, else why not."""
    missing = [f"{mm}:{role}" for mm, role in ROLES if operands.get((mm, role)) is None]
    if missing:
        return f"attention operands {missing} are not quantized"
    for (mm, role), o in operands.items():
        want_stages = ("center_tokens", "cast") if role == "k" else ("cast",)
        if o.stages != want_stages:
            return f"{mm}:{role} transform has stages {o.stages}, the kernel computes {want_stages}"
        if not is_token_cast(o, "fp8", element="e4m3"):
            return (f"{mm}:{role} is {o.fmt} ({o.scaling}, {o.granularity}), the kernel computes a dynamic E4M3 "
                    "row cast rounding to even")
    return None


__all__ = ["IMPLEMENTATIONS", "ROLES", "fp8_attention", "plan_site_reason"]
