"""Weight-only W8A16 / W4A16 GEMM: :mod:`.ref`, :mod:`.gpu` (Mosaic GPU), :mod:`.tpu` (Pallas TPU)."""
