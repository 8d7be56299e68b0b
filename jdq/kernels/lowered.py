"""Packed weights for the kernels, and ``lowered_linear``: the speed path of ``qlinear``.

A :class:`LoweredWeight` is what :func:`jdq.quant.lower` stores per lowered site: the packed
weight arrays in the layout its kernel reads, plus static metadata. :func:`lowered_linear`
quantizes the activation the way the plan's activation transform does and runs the kernel.

Kinds and layouts (``K`` in features, ``N`` out features):

========  ==========================================  ============================================
kind      arrays                                      semantics
========  ==========================================  ============================================
w8a8      ``codes`` (N, K) int8, ``scale`` (N,) f32   per-token dynamic int8 activations (see
                                                      :mod:`jdq.kernels.w8a8.ref`)
w8a16     ``codes`` (N, K) int8, ``scale`` (N, G) f32 bf16/f32 activations; ``G`` groups of
                                                      ``group_size`` along K (``G = 1``: per channel)
w4a16     ``codes`` (N, K/2) int8 packed, ``scale``   as w8a16 with 4-bit codes packed two per byte
          (N, G) f32                                  (:mod:`jdq.kernels.weight_only.ref` layout)
========  ==========================================  ============================================

Implementations (``impl``): ``"auto"`` (the Mosaic GPU kernel on a GPU, XLA elsewhere), ``"xla"``
(the reference in jnp: XLA's int8 dot for w8a8), ``"gpu"``, ``"gpu_interpret"`` (the GPU kernel in
Pallas GPU interpret mode, on a CPU), ``"tpu"``, ``"tpu_interpret"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

KINDS = ("w8a8", "w8a16", "w4a16")
IMPLS = ("auto", "xla", "gpu", "gpu_interpret", "tpu", "tpu_interpret")


@dataclasses.dataclass(frozen=True)
class LoweredWeight:
    """A packed weight: ``codes``/``scale`` arrays and static ``kind``, ``k``, ``n``, ``group_size``."""

    codes: jax.Array
    scale: jax.Array
    kind: str
    k: int
    n: int
    group_size: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the packed arrays as stored."""
        return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in (self.codes, self.scale))


jax.tree_util.register_dataclass(LoweredWeight, data_fields=["codes", "scale"], meta_fields=["kind", "k", "n", "group_size"])


def _interpret_w8a8_config():
    from jdq.kernels.w8a8.gpu import Config

    return Config("pipe", 128, 128, 128, 2)


def _resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        backend = jax.default_backend()
        return "gpu" if backend == "gpu" else ("tpu" if backend == "tpu" else "xla")
    return impl


def _pad_rows(a, multiple):
    m = a.shape[0]
    pad = (-m) % multiple
    return (jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)), m) if pad else (a, m)


def w8a8_matmul(xq, xs, wq, ws, b, out_dtype, impl: str = "auto", config=None):
    """Dispatch the W8A8 GEMM (already-quantized operands) to an implementation.

    GPU kernels need K and N to be multiples of the tile; M is zero-padded. Shapes the kernel
    cannot tile go to the XLA reference (same result: the integer accumulation is exact).
    """
    from jdq.kernels.w8a8 import ref

    impl = _resolve_impl(impl)
    m, k = xq.shape
    n = wq.shape[0]
    if impl in ("gpu", "gpu_interpret"):
        from jdq.kernels import tuning
        from jdq.kernels.w8a8.gpu import Config, w8a8_matmul_gpu

        if config is None and impl == "gpu_interpret":
            config = _interpret_w8a8_config()  # one warpgroup: far fewer simulated threads than "ws"
        cfg = config or Config(**tuning.lookup("w8a8", m))
        cm, cn = cfg.cta_tile()
        if n % cn == 0 and k % cfg.tile_k == 0:
            xq_p, m0 = _pad_rows(xq, cm)
            xs_p, _ = _pad_rows(xs, cm)
            bb = jnp.zeros((n,), jnp.float32) if b is None else b
            out = w8a8_matmul_gpu(xq_p, xs_p, wq, ws, bb, out_dtype, cfg, interpret=impl == "gpu_interpret")
            return out[:m0]
    elif impl in ("tpu", "tpu_interpret"):
        from jdq.kernels.w8a8.tpu import w8a8_matmul_tpu

        return w8a8_matmul_tpu(xq, xs, wq, ws, b, out_dtype, interpret=impl == "tpu_interpret")
    return ref.w8a8_matmul(xq, xs, wq, ws, b, out_dtype)


def weight_only_matmul(x, lw: LoweredWeight, b, out_dtype, impl: str = "auto", config=None):
    """Dispatch a W8A16 / W4A16 GEMM to an implementation (XLA reference where no kernel fits)."""
    from jdq.kernels.weight_only import ref

    impl = _resolve_impl(impl)
    bits = 4 if lw.kind == "w4a16" else 8
    if impl in ("gpu", "gpu_interpret"):
        from jdq.kernels import tuning
        from jdq.kernels.weight_only.gpu import Config, weight_only_matmul_gpu

        cfg = config or Config(**tuning.lookup("weight_only", x.shape[0]))
        if cfg.supports(lw.n, lw.k, lw.group_size or lw.k, bits):
            x_p, m0 = _pad_rows(x, cfg.tile_m)
            out = weight_only_matmul_gpu(x_p, lw.codes, lw.scale, b, bits, lw.group_size or lw.k, out_dtype, cfg,
                                         interpret=impl == "gpu_interpret")
            return out[:m0]
    return ref.weight_only_matmul(x, lw.codes, lw.scale, b, bits, lw.group_size or lw.k, out_dtype)


def lowered_linear(x, lowered: LoweredWeight, b=None, *, site: str, quant: Any = None, act_role: str = "act"):
    """``qlinear``'s speed path: ``x @ W + b`` with ``W`` the packed weight of ``site``.

    ``x`` is (…, K) in the model's compute dtype; the output has ``x``'s dtype. For ``w8a8`` the
    activation is quantized per token here (the quantization the plan's activation cast does).
    """
    if not isinstance(lowered, LoweredWeight):
        raise TypeError(f"lowered_linear at {site!r}: expected a LoweredWeight, got {type(lowered).__name__}")
    if x.shape[-1] != lowered.k:
        raise ValueError(f"lowered_linear at {site!r}: input has {x.shape[-1]} features, the weight expects {lowered.k}")
    impl = getattr(quant, "impl", "auto")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, lowered.k)
    bias = None if b is None else jnp.asarray(b, jnp.float32)
    if lowered.kind == "w8a8":
        from jdq.kernels.w8a8.ref import quantize_per_token

        xq, xs = quantize_per_token(x2)
        y = w8a8_matmul(xq, xs, lowered.codes, lowered.scale, bias, x.dtype, impl)
    elif lowered.kind in ("w8a16", "w4a16"):
        y = weight_only_matmul(x2, lowered, bias, x.dtype, impl)
    else:
        raise ValueError(f"lowered_linear at {site!r}: unknown kind {lowered.kind!r}; known: {KINDS}")
    return y.reshape(*lead, lowered.n)


__all__ = ["IMPLS", "KINDS", "LoweredWeight", "lowered_linear", "w8a8_matmul", "weight_only_matmul"]
