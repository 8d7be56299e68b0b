"""MixDiT mixed-precision GEMM: outlier channels (MX9) and the rest (MX6) in one kernel: :mod:`.ref`, :mod:`.gpu`, :mod:`.tpu`."""

from jdq.kernels.mixdit.ref import mixdit_linear, mixdit_matmul, pack_weight, quantize_activation  # noqa: F401
from jdq.kernels.mixdit.api import IMPLEMENTATIONS, OP, pack, supports  # noqa: F401,E402
