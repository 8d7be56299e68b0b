"""Diffusion transformers (DiT, PixArt-Σ, SD3 MMDiT), the SD VAE and the T5 / CLIP text encoders as pure
functions of params.

``jdq.models.load(path)`` returns ``(model, config)`` from a folder written by
``checkpoints_convert`` (or :func:`save`); ``jdq.models.from_config(config)`` builds a model with
random params. Families live in ``jdq.models.<family>`` (``dit``, ``pixart``, ``sd3``, ``vae``,
``inception``, ``t5``, ``clip``; tokenizers in :mod:`jdq.models.tokenizers`);
see :mod:`jdq.models.base` for the interface they share and :mod:`jdq.models.layers` for the
quantization sites.
"""

from jdq.models.base import (
    FAMILIES,
    ConfigBase,
    Model,
    count_params,
    family_module,
    family_of,
    flatten_params,
    load,
    read_config,
    save,
    save_params,
    unflatten_params,
)


def from_config(config: ConfigBase, key=None, abstract: bool = False) -> Model:
    """A model of ``config``'s family with random params from ``key`` (or abstract params)."""
    return family_module(family_of(config)).from_config(config, key=key, abstract=abstract)


__all__ = [
    "FAMILIES", "ConfigBase", "Model", "count_params", "family_module", "family_of", "flatten_params",
    "from_config", "load", "read_config", "save", "save_params", "unflatten_params",
]
