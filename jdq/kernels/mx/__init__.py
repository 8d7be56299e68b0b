"""MX block-scaled GEMM (MXFP8 E4M3, MXINT8; one E8M0 scale per 32 along K): :mod:`.ref`, :mod:`.gpu`, :mod:`.tpu`."""

from jdq.kernels.mx.ref import FORMATS, block_scales, mx_linear, mx_matmul, quantize_operand  # noqa: F401
from jdq.kernels.mx.api import IMPLEMENTATIONS, OP, pack, supports  # noqa: F401,E402
