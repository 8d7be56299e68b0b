"""W4A8 GEMM: int4 weights (two per byte, group scales) × int8 per-token activations: :mod:`.ref`, :mod:`.gpu`, :mod:`.tpu`."""

from jdq.kernels.w4a8.ref import w4a8_linear, w4a8_matmul  # noqa: F401
from jdq.kernels.w4a8.api import IMPLEMENTATIONS, OP, pack, supports  # noqa: F401,E402
