"""DiT checkpoints -> jdq DiT params: facebookresearch/DiT ``.pt`` state dicts and diffusers' port.

Both keep their own timestep-frequency convention (``Config.timestep_freq_shift`` 0 for the
original, 1 for diffusers) and LayerNorm eps, so each converted model reproduces its source.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from checkpoints_convert.common import (
    CheckpointError,
    StateDict,
    check_like,
    linear_weight,
    patch_conv_weight,
)


def _linear(sd: StateDict, prefix: str, d_in: int, d_out: int) -> dict:
    return {"kernel": linear_weight(sd, f"{prefix}.weight", d_in, d_out), "bias": sd.take(f"{prefix}.bias", (d_out,))}


def _finish(params: dict, cfg, sd: StateDict, what: str):
    from jdq.models import dit

    sd.finish()
    check_like(params, dit.from_config(cfg, abstract=True).params, what)
    return params, cfg


def infer_dit_config(sd: StateDict, num_heads: int | None = None, what: str = "DiT checkpoint"):
    """The DiT config implied by a facebookresearch/DiT state dict's tensor shapes."""
    from jdq.models import dit

    hidden, in_ch, p, p2 = sd.shape("x_embedder.proj.weight")
    if p != p2:
        raise CheckpointError(f"{what}: x_embedder.proj.weight has a non-square patch {p}x{p2}")
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in sd:
        depth += 1
    if depth == 0:
        raise CheckpointError(f"{what}: no transformer blocks (missing key 'blocks.0.attn.qkv.weight')")
    pe = sd.shape("pos_embed")
    if len(pe) != 3 or pe[0] != 1 or pe[2] != hidden or math.isqrt(pe[1]) ** 2 != pe[1]:
        raise CheckpointError(f"{what}: pos_embed has shape {pe}, expected (1, N, {hidden}) with N a square")
    grid = math.isqrt(pe[1])
    rows = sd.shape("y_embedder.embedding_table.weight")[0]
    out_features = sd.shape("final_layer.linear.weight")[0]
    if out_features == p * p * 2 * in_ch:
        learn_sigma = True
    elif out_features == p * p * in_ch:
        learn_sigma = False
    else:
        raise CheckpointError(f"{what}: final_layer.linear.weight has {out_features} outputs; expected "
                              f"{p * p * 2 * in_ch} (learned sigma) or {p * p * in_ch} for patch {p}, {in_ch} channels")
    mlp_hidden = sd.shape("blocks.0.mlp.fc1.weight")[0]
    if num_heads is None:
        if hidden not in dit.HEADS_BY_HIDDEN:
            raise CheckpointError(f"{what}: hidden size {hidden} is not a standard DiT variant "
                                  f"({sorted(dit.HEADS_BY_HIDDEN)}); pass num_heads (--num-heads)")
        num_heads = dit.HEADS_BY_HIDDEN[hidden]
    if hidden % num_heads:
        raise CheckpointError(f"{what}: hidden size {hidden} is not divisible by num_heads={num_heads}")
    return dit.Config(
        input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, num_classes=rows - 1, null_class=True,
        learn_sigma=learn_sigma, timestep_freq_dim=sd.shape("t_embedder.mlp.0.weight")[1],
        timestep_flip_sin_to_cos=True, timestep_freq_shift=0.0, attn_norm_eps=1e-6, mlp_norm_eps=1e-6,
        final_norm_eps=1e-6, source="facebookresearch/DiT")


def convert_dit_state_dict(state_dict: Mapping[str, Any], num_heads: int | None = None):
    """A facebookresearch/DiT state dict -> ``(params, dit.Config)``.

    Hyper-parameters come from the tensors (hidden size, depth, patch, input size, classes,
    learned sigma); the head count from the hidden size (384→6, 768→12, 1024→16, 1152→16) unless
    ``num_heads`` is given. The label table is assumed to carry the null class (DiT trains with
    class dropout), so ``num_classes = rows - 1``. ``pos_embed`` is consumed and checked against
    the fixed sin-cos table jdq computes (it is not a learned parameter).
    """
    from jdq.models import layers

    what = "DiT checkpoint"
    sd = StateDict(state_dict, what)
    cfg = infer_dit_config(sd, num_heads, what)
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    if cfg.mlp_hidden != sd.shape("blocks.0.mlp.fc1.weight")[0]:
        raise CheckpointError(f"{what}: MLP width {sd.shape('blocks.0.mlp.fc1.weight')[0]} is not int(hidden · ratio)")
    pos = sd.take("pos_embed", (1, cfg.grid_size**2, d))[0]
    ref = layers.sincos_pos_embed_2d(d, cfg.grid_size)
    if not np.allclose(pos, ref, atol=1e-5):
        raise CheckpointError(f"{what}: pos_embed differs from the fixed 2-D sin-cos table by up to "
                              f"{np.max(np.abs(pos - ref)):.3g}; this is not a standard DiT")
    params: dict = {
        "x_embedder": {"kernel": patch_conv_weight(sd, "x_embedder.proj.weight", c, d, p),
                       "bias": sd.take("x_embedder.proj.bias", (d,))},
        "t_embedder": {"mlp": {"0": _linear(sd, "t_embedder.mlp.0", cfg.timestep_freq_dim, d),
                               "2": _linear(sd, "t_embedder.mlp.2", d, d)}},
        "y_embedder": {"embedding_table": sd.take("y_embedder.embedding_table.weight", (cfg.num_classes + 1, d))},
        "blocks": {},
        "final_layer": {
            "adaLN_modulation": _linear(sd, "final_layer.adaLN_modulation.1", d, 2 * d),
            "linear": _linear(sd, "final_layer.linear", d, p * p * cfg.out_channels),
        },
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        params["blocks"][i] = {
            "attn": {"qkv": _linear(sd, f"{b}.attn.qkv", d, 3 * d), "proj": _linear(sd, f"{b}.attn.proj", d, d)},
            "mlp": {"fc1": _linear(sd, f"{b}.mlp.fc1", d, cfg.mlp_hidden),
                    "fc2": _linear(sd, f"{b}.mlp.fc2", cfg.mlp_hidden, d)},
            "adaLN_modulation": _linear(sd, f"{b}.adaLN_modulation.1", d, 6 * d),
        }
    return _finish(params, cfg, sd, what)


# diffusers DiTTransformer2DModel config keys that do not change inference.
_DIFFUSERS_IGNORED = {"dropout", "norm_num_groups", "upcast_attention"}
_DIFFUSERS_KNOWN = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
                    "attention_bias", "sample_size", "patch_size", "activation_fn", "num_embeds_ada_norm",
                    "norm_type", "norm_elementwise_affine", "norm_eps"} | _DIFFUSERS_IGNORED


def dit_config_from_diffusers(config: Mapping[str, Any]):
    """The jdq DiT config of a diffusers ``DiTTransformer2DModel`` ``config.json`` dict."""
    from jdq.models import dit

    what = "diffusers DiT config"
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_KNOWN)
    if unknown:
        raise CheckpointError(f"{what}: unknown key(s) {unknown}")
    get = lambda k, default: config.get(k, default)  # noqa: E731  (diffusers' defaults)
    for key, want in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"),
                      ("norm_elementwise_affine", False), ("attention_bias", True)):
        if get(key, want) != want:
            raise CheckpointError(f"{what}: {key}={config[key]!r} is not supported (DiT uses {want!r})")
    heads, head_dim = get("num_attention_heads", 16), get("attention_head_dim", 72)
    in_ch = get("in_channels", 4)
    out_ch = get("out_channels", None) or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{what}: out_channels={out_ch} is neither in_channels ({in_ch}) nor twice it")
    num_classes = get("num_embeds_ada_norm", 1000)
    if num_classes is None:
        raise CheckpointError(f"{what}: num_embeds_ada_norm is None (a DiT needs class labels)")
    return dit.Config(
        input_size=get("sample_size", 32), patch_size=get("patch_size", 2), in_channels=in_ch,
        hidden_size=heads * head_dim, depth=get("num_layers", 28), num_heads=heads, mlp_ratio=4.0,
        num_classes=num_classes, null_class=True, learn_sigma=out_ch == 2 * in_ch,
        timestep_freq_dim=256, timestep_flip_sin_to_cos=True, timestep_freq_shift=1.0,
        attn_norm_eps=1e-6, mlp_norm_eps=float(get("norm_eps", 1e-5)), final_norm_eps=1e-6, source="diffusers")


def convert_diffusers_dit(state_dict: Mapping[str, Any], config: Mapping[str, Any]):
    """A diffusers ``DiTTransformer2DModel`` state dict + config -> ``(params, dit.Config)``.

    diffusers keeps a copy of the timestep and class embedders in every block
    (``transformer_blocks.{i}.norm1.emb``); they are all consumed and must be equal to block
    0's (true of every converted DiT: the port copies one embedder into each block), else the
    conversion fails naming the first differing key. q, k, v are fused into ``attn.qkv``.
    """
    cfg = dit_config_from_diffusers(config)
    what = "diffusers DiT checkpoint"
    sd = StateDict(state_dict, what)
    d, p, c, f = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.mlp_hidden
    emb = "transformer_blocks.0.norm1.emb"
    params: dict = {
        "x_embedder": {"kernel": patch_conv_weight(sd, "pos_embed.proj.weight", c, d, p),
                       "bias": sd.take("pos_embed.proj.bias", (d,))},
        "t_embedder": {"mlp": {"0": _linear(sd, f"{emb}.timestep_embedder.linear_1", 256, d),
                               "2": _linear(sd, f"{emb}.timestep_embedder.linear_2", d, d)}},
        "y_embedder": {"embedding_table": sd.take(f"{emb}.class_embedder.embedding_table.weight",
                                                  (cfg.num_classes + 1, d))},
        "blocks": {},
        "final_layer": {"adaLN_modulation": _linear(sd, "proj_out_1", d, 2 * d),
                        "linear": _linear(sd, "proj_out_2", d, p * p * cfg.out_channels)},
    }
    shared = {f"{emb}.{k}": v for k, v in {
        "timestep_embedder.linear_1.weight": params["t_embedder"]["mlp"]["0"]["kernel"].T,
        "timestep_embedder.linear_1.bias": params["t_embedder"]["mlp"]["0"]["bias"],
        "timestep_embedder.linear_2.weight": params["t_embedder"]["mlp"]["2"]["kernel"].T,
        "timestep_embedder.linear_2.bias": params["t_embedder"]["mlp"]["2"]["bias"],
        "class_embedder.embedding_table.weight": params["y_embedder"]["embedding_table"],
    }.items()}
    for i in range(cfg.depth):
        b = f"transformer_blocks.{i}"
        if i > 0:
            for key0, ref in shared.items():
                key = key0.replace("transformer_blocks.0.", f"{b}.", 1)
                if not np.array_equal(sd.take(key, ref.shape), ref):
                    raise CheckpointError(f"{what}: {key} differs from {key0}; jdq's DiT shares one timestep/class "
                                          f"embedder across blocks, as the original DiT does")
        q, k, v = (_linear(sd, f"{b}.attn1.to_{n}", d, d) for n in "qkv")
        params["blocks"][i] = {
            "attn": {"qkv": {"kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
                             "bias": np.concatenate([q["bias"], k["bias"], v["bias"]])},
                     "proj": _linear(sd, f"{b}.attn1.to_out.0", d, d)},
            "mlp": {"fc1": _linear(sd, f"{b}.ff.net.0.proj", d, f), "fc2": _linear(sd, f"{b}.ff.net.2", f, d)},
            "adaLN_modulation": _linear(sd, f"{b}.norm1.linear", d, 6 * d),
        }
    return _finish(params, cfg, sd, what)
