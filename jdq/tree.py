"""Dotted names for the leaves of a params pytree (``blocks.3.attn.qkv.kernel``), shared by every layer of jdq.

A site of a model (:mod:`jdq.models.layers`) is the path of its :class:`~jdq.models.layers.Linear`,
so its weight is the leaf named ``<site>.kernel``; lowering (:func:`jdq.kernels.lower`) and the
checkpoint I/O of :mod:`jdq.models.base` both read params by these names.
"""

from __future__ import annotations

from typing import Any

import jax


def key_name(k) -> str:
    """The name of one pytree path entry (a dict key, an attribute name or a sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten_params(params) -> dict[str, Any]:
    """``{"blocks.3.attn.qkv.kernel": array, ...}`` from a nested params pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {".".join(key_name(k) for k in path): leaf for path, leaf in leaves}
