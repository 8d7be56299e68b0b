"""LayerNorm + adaLN modulation + per-token quantization in one pass: reference (:mod:`.ref`), Mosaic GPU (:mod:`.gpu`), :mod:`.api`."""

from jdq.kernels.norm_quant.api import norm_quantize_tokens  # noqa: F401
from jdq.kernels.norm_quant.ref import modulated_norm, norm_quantize_rows  # noqa: F401
