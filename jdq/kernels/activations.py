"""Activation functions by name: what ``qlinear(activation=)`` applies and a kernel epilogue may fuse.

They live with the kernels (below the models in jdq's layering) because a fused GEMM epilogue
(:data:`jdq.kernels.w8a8.gpu.FUSED_ACTIVATIONS`) must compute exactly the function the model's
unfused path applies.
"""

from __future__ import annotations

import jax

#: Activations by name (``Mlp``, ``qlinear(activation=)``, the W8A8 kernel epilogue).
ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


def activate(y, activation: str | None):
    """``ACTIVATIONS[activation](y)``; ``None`` returns ``y`` unchanged."""
    return y if activation is None else ACTIVATIONS[activation](y)
