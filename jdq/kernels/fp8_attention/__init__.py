"""FP8 E4M3 flash attention: reference (:mod:`.ref`), Mosaic GPU kernel (:mod:`.gpu`), dispatch and plan matching (:mod:`.api`)."""

from jdq.kernels.fp8_attention.api import IMPLEMENTATIONS, fp8_attention, plan_site_reason  # noqa: F401
from jdq.kernels.fp8_attention.ref import fp8_attention_ref, quantize_operands  # noqa: F401
