"""jdq.kernels."""
