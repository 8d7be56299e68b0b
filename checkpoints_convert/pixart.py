"""diffusers ``PixArtTransformer2DModel`` state dict → jdq PixArt params.

Also holds :func:`convert_by_sites`, the generic mapping used by the PixArt and SD3 converters:
every jdq linear layer is named by its quantization site, which is the diffusers module path, so
``{site}.weight`` (transposed) and ``{site}.bias`` feed it; every other jdq parameter is the
diffusers key spelled by its own path (``transformer_blocks.3.scale_shift_table``).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: a missing, unexpected or misshaped key."""


def _abstract(build_fn, cfg):
    return nnx.eval_shape(lambda: build_fn(cfg, nnx.Rngs(0)))


def expected_keys(model: nnx.Module, conv_sites: Mapping[str, tuple[int, int]] = ()) -> dict[str, tuple]:
    """``{source key: (param path, source shape, how)}`` for every variable of ``model``.

    ``how`` is ``"linear"`` (transpose a (out, in) weight), ``"conv"`` (a (out, C, p, p) patch
    conv flattened to (p·p·C, out) in the (py, px, c) order of ``patchify``) or ``"copy"``.
    ``conv_sites`` maps the site of each patch-embedding conv to its (in_channels, patch).
    """
    from jdq.models.pixart import Linear

    conv_sites = dict(conv_sites)
    linears = {path: m for path, m in nnx.iter_modules(model) if isinstance(m, Linear)}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape = tuple(var.shape)
        owner = linears.get(tuple(path[:-1]))
        if owner is not None and path[-1] == "kernel":
            din, dout = shape
            if owner.site in conv_sites:
                c, p = conv_sites[owner.site]
                key, src, how = f"{owner.site}.weight", (dout, c, p, p), "conv"
            else:
                key, src, how = f"{owner.site}.weight", (dout, din), "linear"
        elif owner is not None and path[-1] == "bias":
            key, src, how = f"{owner.site}.bias", shape, "copy"
        else:
            key, src, how = ".".join(str(k) for k in path), shape, "copy"
        if key in out:
            raise AssertionError(f"two jdq parameters map to source key {key!r}")
        out[key] = (tuple(path), src, how)
    return out


def _set(tree: dict, path: tuple, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def convert_by_sites(state_dict: Mapping[str, Any], model: nnx.Module, conv_sites=(),
                     what: str = "checkpoint") -> dict:
    """Map a diffusers ``state_dict`` onto the (abstract) jdq ``model``; returns nested params.

    Every source key must be consumed and every shape must match: a missing, unexpected or
    misshaped key raises :class:`CheckpointError` naming the key and both shapes. Arrays keep
    their source dtype.
    """
    expected = expected_keys(model, conv_sites)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(
            f"{k} (expected shape {expected[k][1]})" for k in missing[:8]) + (" …" if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(
            f"{k} (shape {tuple(np.shape(state_dict[k]))})" for k in unexpected[:8])
            + (" …" if len(unexpected) > 8 else ""))
    for key, (path, src_shape, how) in expected.items():
        if key in state_dict and tuple(np.shape(state_dict[key])) != src_shape:
            problems.append(f"key {key}: expected shape {src_shape}, found {tuple(np.shape(state_dict[key]))}")
    if problems:
        raise CheckpointError(f"{what} does not match the model config:\n  " + "\n  ".join(problems))

    params: dict = {}
    for key, (path, src_shape, how) in expected.items():
        a = np.asarray(state_dict[key])
        if how == "linear":
            a = a.T
        elif how == "conv":
            dout, c, p, _ = src_shape
            a = a.transpose(2, 3, 1, 0).reshape(p * p * c, dout)
        _set(params, path, np.ascontiguousarray(a))
    return params


def convert_pixart(state_dict: Mapping[str, Any], config: Mapping[str, Any]):
    """A diffusers PixArt transformer ``state_dict`` (numpy arrays) and its ``config.json`` dict → (params, Config).

    ``params`` is the nested dict of :func:`jdq.models.pixart.build`'s parameters (the layout
    of ``nnx.to_pure_dict(nnx.state(model))``).
    """
    from jdq.models import pixart

    cfg = config if isinstance(config, pixart.Config) else pixart.Config.from_dict(config)
    model = _abstract(pixart.build, cfg)
    params = convert_by_sites(state_dict, model, {"pos_embed.proj": (cfg.in_channels, cfg.patch_size)},
                              what="PixArt checkpoint")
    return params, cfg
