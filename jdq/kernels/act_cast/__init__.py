"""An activation and a following MX / MX9-MX6-MX4 cast in one pass: reference (:mod:`.ref`), Mosaic GPU kernel (:mod:`.gpu`), dispatch (:mod:`.api`)."""

from jdq.kernels.act_cast.api import IMPLEMENTATIONS, act_cast  # noqa: F401
from jdq.kernels.act_cast.ref import ACTIVATIONS, reference, supports_cast  # noqa: F401
