"""Fake-quant attention with the probabilities' cast fused: reference (:mod:`.ref`), Mosaic GPU kernel (:mod:`.gpu`), dispatch (:mod:`.api`)."""

from jdq.kernels.quant_attention.api import IMPLEMENTATIONS, quant_attention  # noqa: F401
from jdq.kernels.quant_attention.ref import ProbCast, key_order, prob_cast_of, reference  # noqa: F401
