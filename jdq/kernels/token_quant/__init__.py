"""Per-token (row) activation quantization in one pass: reference (:mod:`.ref`), Mosaic GPU (:mod:`.gpu`)."""

from jdq.kernels.token_quant.ref import FORMATS, quantize_rows  # noqa: F401
