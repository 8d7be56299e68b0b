"""MixDiT's outlier split of a linear input (an activation, the top-k block selection, the MX9 / MX6 cast) in one kernel: reference (:mod:`.ref`), Mosaic GPU kernel (:mod:`.gpu`), dispatch (:mod:`.api`)."""

from jdq.kernels.split_cast.api import IMPLEMENTATIONS, split_cast  # noqa: F401
from jdq.kernels.split_cast.ref import check, reference, unsupported  # noqa: F401
