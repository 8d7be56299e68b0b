"""Pallas GEMM kernels for quantized models, and lowering a plan to them.

Each op is a folder (tokamax's shape): ``<op>/ref.py`` (pure jnp), ``<op>/gpu.py`` (Mosaic GPU,
Hopper), ``<op>/tpu.py`` (Pallas TPU), and ``<op>/api.py``: its implementations, the dispatch
between them, whether it accepts a site of a plan (and why not), and its weight packing
(:class:`jdq.kernels.op.KernelOp`). Block sizes live in :mod:`jdq.kernels.tuning`; the ops are
listed once in :mod:`jdq.kernels.registry`.

Ops: ``token_quant`` (one-pass per-token int8 / E4M3 quantization), ``norm_quant`` (LayerNorm + adaLN
modulation + per-token quantization in one pass), ``w8a8`` (int8 or FP8 E4M3
GEMM, per-token × per-channel scales), ``w4a8``, ``weight_only`` (W8A16 / W4A16), ``mixdit`` (MX9
outliers + MX6 rest in one GEMM), ``mx`` (MXFP8 / MXINT8 block-scaled GEMM), ``fp8_attention`` (E4M3 flash attention: no weight, so not in
the GEMM registry; :func:`lower` marks the attention sites a plan quantizes with its casts and
``jdq.models.layers.attention`` calls :func:`fp8_attention` there).

``lower(plan, params)`` (:mod:`jdq.kernels.lower`) packs the weights of every site a kernel
implements exactly; ``lowered_linear`` is the entry point ``jdq.models.layers.qlinear`` calls for
those sites; see :mod:`jdq.kernels.lowered` for kinds, layouts and ``impl``.
Notes on design, measurements and what is not done: ``jdq/kernels/NOTES.md``.
"""

from jdq.kernels.fp8_attention.api import fp8_attention
from jdq.kernels.lowered import IMPLS, KINDS, LoweredWeight, lowered_linear
from jdq.kernels.mixdit.api import mixdit_matmul
from jdq.kernels.mx.api import mx_matmul
from jdq.kernels.norm_quant.api import norm_quantize_tokens
from jdq.kernels.token_quant.api import quantize_tokens
from jdq.kernels.w4a8.api import w4a8_matmul
from jdq.kernels.w8a8.api import w8a8_matmul
from jdq.kernels.weight_only.api import weight_only_matmul

# The function ``lower`` shadows the submodule of the same name on purpose:
# ``jdq.kernels.lower(plan, params)`` is the public entry point.
from jdq.kernels.lower import LoweredQuantizer, lower, lowerable_kind, weight_bytes  # noqa: E402

__all__ = ["IMPLS", "KINDS", "LoweredQuantizer", "LoweredWeight", "fp8_attention", "lower", "lowerable_kind", "lowered_linear",
           "mixdit_matmul", "mx_matmul", "norm_quantize_tokens", "quantize_tokens", "w4a8_matmul", "w8a8_matmul",
           "weight_bytes", "weight_only_matmul"]
