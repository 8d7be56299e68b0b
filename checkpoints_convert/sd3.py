"""diffusers ``SD3Transformer2DModel`` state dict → jdq SD3 MMDiT params."""

from __future__ import annotations

from typing import Any, Mapping

from checkpoints_convert.pixart import _abstract, convert_by_sites


def convert_sd3(state_dict: Mapping[str, Any], config: Mapping[str, Any]):
    """A diffusers SD3 transformer ``state_dict`` (numpy arrays) and its ``config.json`` dict → (params, Config).

    Covers SD3 and SD3.5 (QK-norm, dual attention). The checkpoint's ``pos_embed.pos_embed``
    buffer (the fixed sin-cos table) is kept as the model's :class:`jdq.models.mmdit.PosEmbedTable`.
    """
    from jdq.models import mmdit

    cfg = config if isinstance(config, mmdit.Config) else mmdit.Config.from_dict(config)
    model = _abstract(mmdit.build, cfg)
    params = convert_by_sites(state_dict, model, {"pos_embed.proj": (cfg.in_channels, cfg.patch_size)},
                              what="SD3 checkpoint")
    return params, cfg
