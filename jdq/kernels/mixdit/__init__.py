"""MixDiT mixed-precision GEMM: outlier channels (MX9) and the rest (MX6) in one kernel: :mod:`.ref`, :mod:`.gpu`, :mod:`.tpu`."""

from jdq.kernels.mixdit.ref import mixdit_linear, mixdit_matmul, pack_weight, quantize_activation  # noqa: F401
