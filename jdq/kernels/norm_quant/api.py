"""``norm_quantize_tokens``: the fused LayerNorm + modulation + per-token quantization, where it applies."""

from __future__ import annotations

import jax.numpy as jnp

from jdq.kernels.op import resolve_impl


def norm_quantize_tokens(x, norm, fmt: str = "int8", impl: str = "auto", config=None):
    """Codes and scales of ``norm(x)`` for ``x`` (B, L, K) with the fused kernel, or ``None`` where it does not apply.

    ``norm`` has ``shift`` / ``scale`` (B, K) and ``eps`` (``jdq.models.layers.AdaNorm``); the
    kernel (:mod:`jdq.kernels.norm_quant`) runs for ``impl`` ``"gpu"`` / ``"gpu_interpret"`` when
    the rows per CTA divide the L tokens of a sample (elsewhere the caller computes ``norm(x)``
    and quantizes it, :func:`jdq.kernels.quantize_tokens`).
    """
    impl = resolve_impl(impl)
    if impl not in ("gpu", "gpu_interpret") or x.ndim != 3 or x.dtype not in (jnp.bfloat16, jnp.float32):
        return None
    from jdq.kernels import tuning
    from jdq.kernels.norm_quant.gpu import Config, norm_quantize_rows_gpu

    b, l, k = x.shape
    cfg = config or Config(**tuning.lookup("norm_quant", b * l))
    if norm.shift.shape != (b, k) or not cfg.supports(b * l, k, jnp.dtype(x.dtype).itemsize, l):
        return None
    return norm_quantize_rows_gpu(x.reshape(b * l, k), norm.shift, norm.scale, l, float(norm.eps), fmt, cfg,
                                  interpret=impl == "gpu_interpret")
