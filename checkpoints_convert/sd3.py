"""diffusers ``SD3Transformer2DModel`` state dict → jdq SD3 MMDiT params (SD3 and SD3.5)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from checkpoints_convert.common import CheckpointError, StateDict, check_like
from checkpoints_convert.pixart import convert_by_paths

#: How far the checkpoint's stored position table may be from the one jdq computes: the rounding
#: of a half-precision copy (bf16: 2⁻⁹ for values in [-1, 1]), far below any real difference.
POS_EMBED_ATOL = 2.5e-3


def check_position_table(sd: StateDict, cfg, what: str, rows_per_chunk: int = 16):
    """Consume ``pos_embed.pos_embed`` and check it against :func:`jdq.models.mmdit.position_table`.

    Compared in chunks of grid rows (the SD3.5 table has 384² × hidden entries).
    """
    from jdq.models import mmdit

    m = cfg.pos_embed_max_size
    table = sd.take("pos_embed.pos_embed", (1, m * m, cfg.inner_dim))[0]
    worst = 0.0
    for r0 in range(0, m, rows_per_chunk):
        rows = np.arange(r0, min(r0 + rows_per_chunk, m))
        ref = mmdit.position_table(cfg, rows=rows)
        got = np.asarray(table[r0 * m:(r0 + len(rows)) * m], np.float32)
        worst = max(worst, float(np.max(np.abs(got - ref))))
    if worst > POS_EMBED_ATOL:
        raise CheckpointError(f"{what}: pos_embed.pos_embed differs from the 2-D sin-cos table of this config "
                              f"(pos_embed_max_size={m}, sample_size={cfg.sample_size}, patch_size="
                              f"{cfg.patch_size}) by up to {worst:.3g} (> {POS_EMBED_ATOL})")


def convert_sd3(state_dict: Mapping[str, Any], config: Mapping[str, Any]):
    """A diffusers SD3 transformer ``state_dict`` and its ``config.json`` dict → ``(params, mmdit.Config)``.

    Covers SD3 and SD3.5 (QK-norm, dual attention). Every key is consumed and shape-checked
    (errors name the key and both shapes); the stored position table is checked, not kept.
    """
    from jdq.models import mmdit

    what = "diffusers SD3 checkpoint"
    try:
        cfg = config if isinstance(config, mmdit.Config) else mmdit.Config.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: {e}") from None
    abstract = mmdit.from_config(cfg, abstract=True).params
    sd = StateDict(state_dict, what)
    if cfg.pos_embed_max_size:
        check_position_table(sd, cfg, what)
    params = convert_by_paths(sd, abstract, {"pos_embed.proj": (cfg.in_channels, cfg.patch_size)})
    sd.finish()
    check_like(params, abstract, what)
    return params, cfg
