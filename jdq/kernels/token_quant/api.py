"""``quantize_tokens``: per-token quantization on the implementation ``impl`` selects."""

from __future__ import annotations

import jax.numpy as jnp

from jdq.kernels.op import dispatch


def _gpu(x, fmt, *, impl, config=None):
    if impl not in ("gpu", "gpu_interpret") or x.ndim != 2 or x.dtype not in (jnp.bfloat16, jnp.float32):
        return None  # gpu_xla_quant leaves the quantization to XLA
    from jdq.kernels import tuning
    from jdq.kernels.token_quant.gpu import Config, quantize_rows_gpu

    cfg = config or Config(**tuning.lookup("token_quant", x.shape[0]))
    if not cfg.supports(x.shape[0], x.shape[1], jnp.dtype(x.dtype).itemsize):
        return None
    return quantize_rows_gpu(x, fmt, cfg, interpret=impl == "gpu_interpret")


def _xla(x, fmt, *, impl, config=None):
    from jdq.kernels.token_quant.ref import quantize_rows

    return quantize_rows(x, fmt)


#: The implementations of per-token quantization (no TPU kernel: XLA there).
IMPLEMENTATIONS = {"gpu": _gpu, "xla": _xla}


def quantize_tokens(x, fmt: str = "int8", impl: str = "auto", config=None):
    """Per-token quantization of ``x`` (M, K) to ``fmt`` (``"int8"``/``"fp8_e4m3"``): the one-pass kernel or XLA."""
    return dispatch(IMPLEMENTATIONS, impl, x, fmt, config=config)
