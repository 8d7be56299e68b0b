"""Per-row radix threshold of distinct keys (MixDiT's top-k block selection): reference (:mod:`.ref`), Mosaic GPU kernel (:mod:`.gpu`), dispatch (:mod:`.api`)."""

from jdq.kernels.row_select.api import IMPLEMENTATIONS, threshold, top_mask  # noqa: F401
from jdq.kernels.row_select.ref import MAX_BITS, unique_keys  # noqa: F401
