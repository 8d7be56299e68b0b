"""Per-token (row) activation quantization in one pass: reference (:mod:`.ref`), Mosaic GPU (:mod:`.gpu`), dispatch (:mod:`.api`)."""

from jdq.kernels.token_quant.api import IMPLEMENTATIONS, quantize_tokens  # noqa: F401
from jdq.kernels.token_quant.ref import FORMATS, quantize_rows  # noqa: F401
