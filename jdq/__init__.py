"""jdq: quantization of diffusion transformers in JAX.

Subpackages are imported lazily (``jdq.formats``, ``jdq.quant``, ``jdq.models``,
``jdq.sampling``, ``jdq.kernels``, ``jdq.hw``, ``jdq.recipes``) so that importing one does
not pay for, or depend on, the others.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("formats", "quant", "models", "sampling", "kernels", "hw", "recipes", "cli")


def __getattr__(name):
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"jdq.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'jdq' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBPACKAGES))
