"""diffusers ``AutoencoderKL`` -> jdq VAE params (module paths are diffusers', so a rename per type)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from checkpoints_convert.common import CheckpointError, StateDict, check_like

# diffusers AutoencoderKL config keys that do not change the encoder/decoder graph.
_IGNORED = {"force_upcast", "latents_mean", "latents_std"}
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


def vae_config_from_diffusers(config: Mapping[str, Any]):
    """The jdq VAE config of a diffusers ``AutoencoderKL`` ``config.json`` dict."""
    from jdq.models import vae

    what = "diffusers AutoencoderKL config"
    kwargs = {}
    fields = {f for f in vae.Config.__dataclass_fields__} - {"dtype"}
    for k, v in config.items():
        if k.startswith("_"):
            continue
        if k in _BLOCK_TYPES:
            bad = [t for t in v if t != _BLOCK_TYPES[k]]
            if bad:
                raise CheckpointError(f"{what}: {k} contains {bad}; only {_BLOCK_TYPES[k]} is supported")
            continue
        if k == "act_fn":
            if v != "silu":
                raise CheckpointError(f"{what}: act_fn={v!r} is not supported (only 'silu')")
            continue
        if k in fields:
            kwargs[k] = tuple(v) if isinstance(v, list) else v
        elif k not in _IGNORED:
            raise CheckpointError(f"{what}: unknown key {k!r}")
    n = len(kwargs.get("block_out_channels", vae.Config.block_out_channels))
    for k in _BLOCK_TYPES:
        if k in config and len(config[k]) != n:
            raise CheckpointError(f"{what}: {k} has {len(config[k])} entries for {n} block_out_channels")
    try:
        return vae.Config(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"{what}: {e}") from None


def convert_vae(state_dict: Mapping[str, Any], config: Mapping[str, Any]):
    """A diffusers ``AutoencoderKL`` state dict + config -> ``(params, vae.Config)``.

    Conv weights (out, in, k, k) become HWIO kernels, linear weights are transposed, GroupNorm
    ``weight`` becomes ``scale``; everything else keeps its path.
    """
    from flax import nnx

    from jdq.models import layers, vae

    cfg = config if isinstance(config, vae.Config) else vae_config_from_diffusers(config)
    what = "diffusers AutoencoderKL checkpoint"
    sd = StateDict(state_dict, what)
    module = nnx.eval_shape(lambda: vae.build(cfg, nnx.Rngs(params=0)))
    params: dict = {}

    def put(path, name, value):
        node = params
        for k in path:
            node = node.setdefault(k, {})
        node[name] = np.ascontiguousarray(value)

    for path, m in nnx.iter_modules(module):
        key = ".".join(str(p) for p in path)
        if isinstance(m, vae.Conv2d):
            k, _, c_in, c_out = m.kernel.shape
            put(path, "kernel", sd.take(f"{key}.weight", (c_out, c_in, k, k)).transpose(2, 3, 1, 0))
            put(path, "bias", sd.take(f"{key}.bias", (c_out,)))
        elif isinstance(m, layers.Linear):
            d_in, d_out = m.kernel.shape
            w = f"{key}.weight"
            if w in sd and len(sd.shape(w)) == 4:  # old checkpoints store attention projections as 1x1 convs
                put(path, "kernel", sd.take(w, (d_out, d_in, 1, 1))[:, :, 0, 0].T)
            else:
                put(path, "kernel", sd.take(w, (d_out, d_in)).T)
            put(path, "bias", sd.take(f"{key}.bias", (d_out,)))
        elif isinstance(m, vae.GroupNorm):
            (c,) = m.scale.shape
            put(path, "scale", sd.take(f"{key}.weight", (c,)))
            put(path, "bias", sd.take(f"{key}.bias", (c,)))
    sd.finish()
    check_like(params, nnx.to_pure_dict(nnx.state(module)), what)
    return params, cfg
