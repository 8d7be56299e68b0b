"""diffusers ``PixArtTransformer2DModel`` state dict → jdq PixArt params.

jdq's PixArt and SD3 modules are laid out as diffusers lays its modules out, so the mapping is
generic (:func:`convert_by_paths`): the params path ``transformer_blocks.3.attn1.to_q.kernel`` is
the transposed ``transformer_blocks.3.attn1.to_q.weight``, the patch embedding's kernel is the
flattened conv ``pos_embed.proj.weight``, a norm's ``scale`` is its ``weight``, and every other
parameter has its diffusers name.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from checkpoints_convert.common import CheckpointError, StateDict, check_like, linear_weight, patch_conv_weight


def convert_by_paths(sd: StateDict, abstract_params, conv_sites: Mapping[str, tuple[int, int]] = ()) -> dict:
    """Fill ``abstract_params`` (a jdq model's params of ``ShapeDtypeStruct``) from diffusers keys.

    ``{path}.kernel`` ← ``{path}.weight`` transposed (a linear) or, for a path in ``conv_sites``
    (``{site: (in_channels, patch)}``), flattened from a (out, C, p, p) patch conv; a norm's
    ``{path}.scale`` ← ``{path}.weight``; every other leaf ← the key spelled by its path. Each key is shape-checked as it is taken; the caller
    calls ``sd.finish()`` to reject keys left over.
    """
    from jdq.models.base import flatten_params, unflatten_params

    conv_sites = dict(conv_sites)
    flat = {}
    for path, leaf in flatten_params(abstract_params).items():
        shape = tuple(leaf.shape)
        if path.endswith(".kernel"):
            site = path[: -len(".kernel")]
            if site in conv_sites:
                c, p = conv_sites[site]
                flat[path] = patch_conv_weight(sd, f"{site}.weight", c, shape[1], p)
            else:
                flat[path] = linear_weight(sd, f"{site}.weight", shape[0], shape[1])
        elif path.endswith(".scale"):  # jdq's norm weight
            flat[path] = sd.take(path[: -len(".scale")] + ".weight", shape)
        else:
            flat[path] = sd.take(path, shape)
    return unflatten_params({k: np.ascontiguousarray(v) for k, v in flat.items()}, abstract_params)


def convert_pixart(state_dict: Mapping[str, Any], config: Mapping[str, Any]):
    """A diffusers PixArt transformer ``state_dict`` and its ``config.json`` dict → ``(params, pixart.Config)``.

    Accepts ``PixArtTransformer2DModel`` configs and the older ``Transformer2DModel`` ones with
    ``norm_type='ada_norm_single'`` (e.g. PixArt-Σ's published folder). Every key is consumed and
    shape-checked; a mismatch raises :class:`~checkpoints_convert.common.CheckpointError` naming
    the key and both shapes.
    """
    from jdq.models import pixart

    what = "diffusers PixArt checkpoint"
    try:
        cfg = config if isinstance(config, pixart.Config) else pixart.Config.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: {e}") from None
    abstract = pixart.from_config(cfg, abstract=True).params
    sd = StateDict(state_dict, what)
    params = convert_by_paths(sd, abstract, {"pos_embed.proj": (cfg.in_channels, cfg.patch_size)})
    sd.finish()
    check_like(params, abstract, what)
    return params, cfg
