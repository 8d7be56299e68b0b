"""Pallas GEMM kernels for quantized models: ``<op>/ref.py`` (pure jnp), ``<op>/gpu.py`` (Mosaic
GPU, Hopper), ``<op>/tpu.py`` (Pallas TPU), block sizes in :mod:`jdq.kernels.tuning`.

``lowered_linear`` is the entry point ``jdq.models.layers.qlinear`` calls for sites that
:func:`jdq.quant.lower` packed; see :mod:`jdq.kernels.lowered` for kinds, layouts and ``impl``.
Notes on design, measurements and what is not done: ``jdq/kernels/NOTES.md``.
"""

from jdq.kernels.lowered import IMPLS, KINDS, LoweredWeight, lowered_linear, w8a8_matmul, weight_only_matmul

__all__ = ["IMPLS", "KINDS", "LoweredWeight", "lowered_linear", "w8a8_matmul", "weight_only_matmul"]
