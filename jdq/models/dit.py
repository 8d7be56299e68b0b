"""DiT (Peebles & Xie, 2023) as facebookresearch/DiT defines it, as a pure function of params.

``model(x, t, y)``: ``x`` latents (B, H, W, C) channels-last, ``t`` timesteps (B,) (or a scalar),
``y`` int class labels (B,) where ``y == num_classes`` is the null class of classifier-free
guidance. Returns (B, H, W, out_channels); with a learned sigma the first ``in_channels``
channels are the noise prediction and the rest the variance interpolation ``v``.

Structure (adaLN-Zero): patch embedding + fixed 2-D sin-cos positions; conditioning
``c = t_embedder(t) + y_embedder(y)``; ``depth`` blocks of
``x += gate·attn(modulate(LN(x)))``, ``x += gate·mlp(modulate(LN(x)))`` with the six modulation
vectors from ``adaLN_modulation(silu(c))``; a final adaLN layer and a linear to patches.

Quantization sites (``blocks.{i}`` for ``i < depth``):

==================================  ========================================  ===================
site                                what                                      activation role
==================================  ========================================  ===================
``x_embedder``                      patch embedding (a p×p stride-p conv)      ``act``
``t_embedder.mlp.0`` / ``.mlp.2``   timestep MLP                              ``act``
``blocks.{i}.adaLN_modulation``     6·hidden modulation from ``silu(c)``      ``act``
``blocks.{i}.attn.qkv``             fused q/k/v projection                    ``act``
``blocks.{i}.attn.qk`` / ``.pv``    q·kᵀ (roles q, k) and p·v (attn_prob, v)
``blocks.{i}.attn.proj``            attention output projection               ``act``
``blocks.{i}.mlp.fc1`` / ``.fc2``   MLP (GELU-tanh between)                   ``act`` / ``post_gelu``
``final_layer.adaLN_modulation``    2·hidden modulation                       ``act``
``final_layer.linear``              tokens -> patches                         ``act``
==================================  ========================================  ===================

The class embedding is a table lookup (``y_embedder.embedding_table``), not a matmul. The
timestep-frequency convention is in the config: facebookresearch/DiT uses ``freq_shift=0``,
diffusers' DiT port ``freq_shift=1`` (and LayerNorm eps 1e-5 before the MLP); each converted
checkpoint keeps its source's convention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jdq.models.base import ConfigBase, Model
from jdq.models.spec import FamilySpec, NamedConfig, abstract_array
from jdq.models.layers import (
    AdaNorm,
    GatedResidual,
    Linear,
    Mlp,
    PatchEmbed,
    SelfAttention,
    TimestepEmbedder,
    layer_norm,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)

FAMILY = "dit"

#: Variant -> (hidden size, depth, heads), from the DiT paper (Table 1).
VARIANTS = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
#: Default head count for a hidden size (the standard variants).
HEADS_BY_HIDDEN = {384: 6, 768: 12, 1024: 16, 1152: 16}


@dataclasses.dataclass(frozen=True)
class Config(ConfigBase):
    """DiT hyper-parameters. ``input_size`` is the latent side (256 px -> 32, 512 px -> 64)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    null_class: bool = True  # the label table has num_classes + 1 rows; y == num_classes is "no class"
    learn_sigma: bool = True  # out_channels = 2 * in_channels
    timestep_freq_dim: int = 256
    timestep_flip_sin_to_cos: bool = True
    timestep_freq_shift: float = 0.0  # 0: facebookresearch/DiT, 1: diffusers' DiT port
    attn_norm_eps: float = 1e-6
    mlp_norm_eps: float = 1e-6  # diffusers' DiT port: its config's norm_eps (1e-5)
    final_norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype ("bfloat16" for speed); params keep their own dtype
    source: str = "random"  # where the weights came from: "facebookresearch/DiT", "diffusers", "random"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiT config: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiT config: input_size {self.input_size} not divisible by patch_size {self.patch_size}")
        if self.hidden_size % 4:
            raise ValueError(f"DiT config: hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos positions)")
        jnp.dtype(self.dtype)  # raises on an unknown dtype name

    @property
    def out_channels(self) -> int:
        """Output channels: ``2·in_channels`` with a learned sigma, else ``in_channels``."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.input_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden width ``int(hidden_size · mlp_ratio)``."""
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def variant(cls, name: str = "XL/2", resolution: int = 256, **overrides) -> "Config":
        """The published variants: ``"S/2"`` … ``"XL/8"`` at ``resolution`` 256 or 512 (latent /8)."""
        try:
            size, patch = name.split("/")
            hidden, depth, heads = VARIANTS[size]
            patch = int(patch)
        except (ValueError, KeyError):
            raise ValueError(f"unknown DiT variant {name!r}; use one of S, B, L, XL with /2, /4 or /8") from None
        if resolution % 8:
            raise ValueError(f"DiT resolution {resolution} is not a multiple of 8 (the VAE downsamples by 8)")
        kw = dict(input_size=resolution // 8, patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads)
        kw.update(overrides)
        return cls(**kw)


class LabelEmbedder(nnx.Module):
    """Class label -> vector by table lookup; row ``num_classes`` is the null (CFG) class if present."""

    def __init__(self, num_classes: int, dim: int, *, null_class: bool, rngs: nnx.Rngs):
        rows = num_classes + int(null_class)
        self.embedding_table = nnx.Param(jax.random.normal(rngs.params(), (rows, dim), jnp.float32) * 0.02)

    def __call__(self, y):
        return jnp.take(self.embedding_table[...], jnp.asarray(y, jnp.int32), axis=0)


class DiTBlock(nnx.Module):
    """adaLN-Zero transformer block: self-attention and MLP, each gated and modulated by ``c``."""

    def __init__(self, config: Config, *, site: str, rngs: nnx.Rngs):
        d = config.hidden_size
        self.attn_norm_eps = config.attn_norm_eps
        self.mlp_norm_eps = config.mlp_norm_eps
        self.attn = SelfAttention(d, config.num_heads, site=f"{site}.attn", rngs=rngs)
        self.mlp = Mlp(d, config.mlp_hidden, site=f"{site}.mlp", rngs=rngs, activation="gelu_tanh")
        self.adaLN_modulation = Linear(d, 6 * d, site=f"{site}.adaLN_modulation", rngs=rngs)

    def __call__(self, x, c, quant=None):
        mod = self.adaLN_modulation(jax.nn.silu(c), quant)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        # x + gate·attn(modulate(LN(x))): norm and gated residual passed in, so a lowered site can fuse them
        x = self.attn(x, quant, norm=AdaNorm(shift_msa, scale_msa, self.attn_norm_eps), residual=GatedResidual(x, gate_msa))
        return self.mlp(x, quant, norm=AdaNorm(shift_mlp, scale_mlp, self.mlp_norm_eps), residual=GatedResidual(x, gate_mlp))


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) + LayerNorm + linear from tokens to patches."""

    def __init__(self, config: Config, *, site: str, rngs: nnx.Rngs):
        d = config.hidden_size
        self.eps = config.final_norm_eps
        self.adaLN_modulation = Linear(d, 2 * d, site=f"{site}.adaLN_modulation", rngs=rngs)
        self.linear = Linear(d, config.patch_size**2 * config.out_channels, site=f"{site}.linear", rngs=rngs)

    def __call__(self, x, c, quant=None):
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c), quant), 2, axis=-1)
        return self.linear(modulate(layer_norm(x, eps=self.eps), shift, scale), quant)


class DiT(nnx.Module):
    """The DiT network; ``__call__(x, t, y, quant=None)`` (see the module docstring)."""

    def __init__(self, config: Config, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.x_embedder = PatchEmbed(c.in_channels, c.patch_size, c.hidden_size, site="x_embedder", rngs=rngs)
        self.t_embedder = TimestepEmbedder(c.hidden_size, site="t_embedder", rngs=rngs, freq_dim=c.timestep_freq_dim,
                                           flip_sin_to_cos=c.timestep_flip_sin_to_cos, freq_shift=c.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, null_class=c.null_class, rngs=rngs)
        self.blocks = nnx.List([DiTBlock(c, site=f"blocks.{i}", rngs=rngs) for i in range(c.depth)])
        self.final_layer = FinalLayer(c, site="final_layer", rngs=rngs)

    def __call__(self, x, t, y, quant=None):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        if x.ndim != 4 or x.shape[1:] != (c.input_size, c.input_size, c.in_channels):
            raise ValueError(f"DiT: x must be (B, {c.input_size}, {c.input_size}, {c.in_channels}) channels-last, "
                             f"got {tuple(x.shape)}")
        pos = sincos_pos_embed_2d(c.hidden_size, c.grid_size)
        h = self.x_embedder(x.astype(dtype), quant) + jnp.asarray(pos, dtype)
        cond = self.t_embedder(t, quant, dtype) + self.y_embedder(y).astype(dtype)
        for block in self.blocks:
            h = block(h, cond, quant)
        h = self.final_layer(h, cond, quant)
        return unpatchify(h, c.patch_size, c.grid_size, c.grid_size)


def build(config: Config, rngs: nnx.Rngs) -> DiT:
    """The DiT module for ``config`` with random params from ``rngs``."""
    return DiT(config, rngs)


def from_config(config: Config, key=None, abstract: bool = False) -> Model:
    """A :class:`~jdq.models.base.Model` of ``config``: random params from ``key``, or abstract ones."""
    return Model.abstract(config, build) if abstract else Model.create(config, build, key)


# --------------------------------------------------------------------------------------------
# The family's conventions (jdq.models.spec)
# --------------------------------------------------------------------------------------------


def _guided_channels(cfg: Config) -> int:
    """facebookresearch/DiT's ``forward_with_cfg`` guides 3 of the 4 eps channels "for exact
    reproducibility"; a DiT converted from it (``config.source``) keeps that. Other DiTs guide
    their ``in_channels`` eps channels (diffusers' DiT pipeline)."""
    if cfg.source == "facebookresearch/DiT" and cfg.in_channels == 4:
        return 3
    return cfg.in_channels


def _null_condition(cfg: Config):
    """The null class (``num_classes``), the unconditional input of classifier-free guidance."""
    if not cfg.null_class:
        raise ValueError("this DiT has no null class, so it cannot use classifier-free guidance (use guidance 1)")
    return jnp.full((1,), cfg.num_classes, jnp.int32)


SPEC = FamilySpec(
    name=FAMILY,
    denoise=lambda model, params, x, t, y, quant=None: model.apply(params, x, t, y, quant=quant),
    sample_shape=lambda cfg: (cfg.input_size, cfg.input_size, cfg.in_channels),
    defaults={"sampler": "ddpm", "steps": 250, "guidance": 4.0},
    abstract_inputs=lambda cfg, b: (abstract_array((b, cfg.input_size, cfg.input_size, cfg.in_channels)),
                                    abstract_array((b,)), abstract_array((b,), jnp.int32)),
    guided_channels=_guided_channels,
    null_condition=_null_condition,
    configs={"dit-xl-2": NamedConfig(FAMILY, lambda: Config.variant("XL/2", 256), 50,
                                     "DiT-XL/2, 256x256 (latent 32x32x4, 256 tokens), class-conditional")},
)
