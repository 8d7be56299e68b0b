"""W8A8 int8 GEMM: reference (:mod:`.ref`), Mosaic GPU (:mod:`.gpu`), Pallas TPU (:mod:`.tpu`)."""

from jdq.kernels.w8a8.ref import (  # noqa: F401
    epilogue,
    fake_quant_linear,
    int8_accumulate,
    quantize_per_channel,
    quantize_per_token,
    w8a8_linear,
    w8a8_matmul,
)
from jdq.kernels.w8a8.api import IMPLEMENTATIONS, OP, pack, supports  # noqa: F401,E402
