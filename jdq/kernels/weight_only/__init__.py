"""Weight-only W8A16 / W4A16 GEMM: :mod:`.ref`, :mod:`.gpu` (Mosaic GPU), :mod:`.tpu` (Pallas TPU), :mod:`.api` (the op)."""

from jdq.kernels.weight_only.api import IMPLEMENTATIONS, OP, pack, supports  # noqa: F401,E402
