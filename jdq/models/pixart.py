"""PixArt-Σ (and PixArt-α) as diffusers' ``PixArtTransformer2DModel``, as a pure function of params.

``model(x, t, text_emb, mask=None, resolution=None, aspect_ratio=None)``: NHWC latents ``x``
(B, H, W, C), timesteps ``t`` (B,) (the DDPM index 0…999, or a scalar), T5 embeddings
``text_emb`` (B, L, caption_channels) and an optional text mask (B, L) (1/True keeps a token).
Returns (B, H, W, out_channels): the noise and, with 8 output channels, the learned variance.
Any latent size that is a multiple of the patch works (the sin-cos positions are recomputed for
the grid, as diffusers does); the compute dtype is ``Config.dtype``.

Quantization sites are diffusers' module paths (and, as everywhere in jdq, the params paths of
the layers' ``kernel``/``bias``; norm weights are jdq's ``scale``), so a rule written against a
PyTorch PixArt reads the same here:

=====================================================  ==================================  ============
site                                                   what                                input role
=====================================================  ==================================  ============
``pos_embed.proj``                                     patch embedding (p×p stride-p conv)  ``act``
``caption_projection.linear_1`` / ``.linear_2``         T5 → hidden MLP (GELU-tanh)          ``act`` / ``post_gelu``
``adaln_single.emb.timestep_embedder.linear_1/_2``      timestep MLP (SiLU)                  ``act``
``adaln_single.emb.resolution_embedder.linear_1/_2``    micro-conditions (when present)      ``act``
``adaln_single.emb.aspect_ratio_embedder.linear_1/_2``  micro-conditions (when present)      ``act``
``adaln_single.linear``                                 the shared 6·hidden adaLN-single     ``act``
``transformer_blocks.{i}.attn1.to_q/to_k/to_v``         self-attention projections           ``act``
``transformer_blocks.{i}.attn1.qk`` / ``.pv``           self-attention matmuls (q, k / attn_prob, v)
``transformer_blocks.{i}.attn1.to_out.0``               self-attention output                ``act``
``transformer_blocks.{i}.attn2.to_q``                   cross-attention query (image)        ``act``
``transformer_blocks.{i}.attn2.to_k/to_v``              cross-attention key/value (text)     ``act``
``transformer_blocks.{i}.attn2.qk`` / ``.pv``           cross-attention matmuls
``transformer_blocks.{i}.attn2.to_out.0``               cross-attention output               ``act``
``transformer_blocks.{i}.ff.net.0.proj``                MLP fc1                              ``act``
``transformer_blocks.{i}.ff.net.2``                     MLP fc2                              ``post_gelu``
``proj_out``                                            tokens → patches                     ``act``
=====================================================  ==================================  ============

The text mask is applied as a boolean mask (masked keys get probability 0). diffusers adds a
−10000 bias instead: the same softmax, except that a sample whose tokens are all masked attends
to all of them (the constant bias cancels); jdq does the same for such a sample.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jdq.models import layers
from jdq.models.base import ConfigBase, Model
from jdq.models.spec import FamilySpec, NamedConfig, abstract_array
from jdq.models.layers import Attention, FeedForward, Linear, PatchEmbedding, TwoLayer, layer_norm, unpatchify

FAMILY = "pixart"

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

# diffusers config keys that do not change the inference graph of a PixArt transformer.
_IGNORED_KEYS = frozenset({"dropout", "norm_num_groups", "upcast_attention", "use_linear_projection"})
# Transformer2DModel (the class name of older PixArt configs) keys that must keep their default.
_MUST_BE_UNSET = {"only_cross_attention": False, "double_self_attention": False, "num_vector_embeds": None}


@dataclasses.dataclass(frozen=True)
class Config(ConfigBase):
    """A PixArt transformer's hyper-parameters (diffusers' ``PixArtTransformer2DModel`` arguments).

    Defaults are diffusers' (a ``config.json`` lacking a key means what it means to diffusers);
    :data:`PIXART_SIGMA_XL_2_1024_MS` is the published PixArt-Σ configuration. ``None`` defaults
    are resolved as diffusers resolves them: ``out_channels`` → ``in_channels``,
    ``interpolation_scale`` → ``max(sample_size // 64, 1)``, ``use_additional_conditions`` →
    ``sample_size == 128``. ``dtype`` is the compute dtype (inputs are cast to it).
    """

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = 8
    num_layers: int = 28
    cross_attention_dim: int | None = 1152
    attention_bias: bool = True
    sample_size: int = 128
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int | None = 1000
    norm_type: str = "ada_norm_single"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    use_additional_conditions: bool | None = None
    caption_channels: int | None = None
    attention_type: str = "default"
    dtype: str = "float32"

    def __post_init__(self):
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.interpolation_scale is None:
            object.__setattr__(self, "interpolation_scale", max(self.sample_size // 64, 1))
        if self.use_additional_conditions is None:
            object.__setattr__(self, "use_additional_conditions", self.sample_size == 128)
        if self.norm_type != "ada_norm_single":
            raise ValueError(f"PixArt config: norm_type={self.norm_type!r} is not supported (only 'ada_norm_single')")
        if self.attention_type != "default":
            raise ValueError(f"PixArt config: attention_type={self.attention_type!r} is not supported (only 'default')")
        if self.activation_fn not in ("gelu-approximate", "gelu"):
            raise ValueError(f"PixArt config: activation_fn={self.activation_fn!r} is not supported "
                             "('gelu-approximate' or 'gelu')")
        if self.cross_attention_dim is None:
            raise ValueError("PixArt config: cross_attention_dim=None (no cross-attention) is not supported")
        if self.inner_dim % 4:
            raise ValueError(f"PixArt config: hidden size {self.inner_dim} must be divisible by 4 (2-D sin-cos positions)")
        if self.use_additional_conditions and self.inner_dim % 3:
            raise ValueError(f"PixArt config: use_additional_conditions needs a hidden size divisible by 3 "
                             f"(resolution and aspect-ratio embeddings of size hidden/3), got {self.inner_dim}")
        if self.caption_channels is not None and self.cross_attention_dim != self.inner_dim:
            raise ValueError(f"PixArt config: with a caption projection the text is projected to the hidden size "
                             f"{self.inner_dim}, so cross_attention_dim must equal it, got {self.cross_attention_dim}")
        jnp.dtype(self.dtype)  # raises on an unknown dtype name

    @property
    def inner_dim(self) -> int:
        """Hidden size: heads × head dimension."""
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """From a jdq config dict or a diffusers ``config.json`` dict (``PixArtTransformer2DModel``, or
        ``Transformer2DModel`` with ``norm_type='ada_norm_single'``).

        ``_``-keys and keys that do not affect inference (dropout, …) are ignored; an unknown key,
        or one selecting a variant this port does not implement, raises ``ValueError`` naming it.
        """
        kept = {}
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in _MUST_BE_UNSET:
                if value != _MUST_BE_UNSET[key]:
                    raise ValueError(f"PixArt config: {key}={value!r} is not supported")
                continue
            kept[key] = value
        return super().from_dict(kept)


#: PixArt-Σ-XL/2 at 1024 px (``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS``, transformer/config.json, as
#: diffusers' ``scripts/convert_pixart_sigma_to_diffusers.py --image_size 1024`` writes it): 28
#: layers, 16 heads × 72, T5-XXL captions (4096), interpolation scale 2, no micro-conditions.
#: 610,856,096 parameters: diffusers' ``PixArtTransformer2DModel(**this)`` built on the meta
#: device, ``sum(p.numel() for p in model.parameters())`` (the paper's "0.6B").
PIXART_SIGMA_XL_2_1024_MS = Config(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False,
    caption_channels=4096,
)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class PixArtBlock(nnx.Module):
    """diffusers' ``BasicTransformerBlock`` with ``norm_type='ada_norm_single'`` (PixArt)."""

    def __init__(self, cfg: Config, index: int, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        site = f"transformer_blocks.{index}"
        heads, hd = cfg.num_attention_heads, cfg.attention_head_dim
        self.norm1 = layers.LayerNorm(d, eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine)
        self.attn1 = Attention(d, heads, hd, site=f"{site}.attn1", rngs=rngs, bias=cfg.attention_bias)
        self.norm2 = layers.LayerNorm(d, eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine)
        self.attn2 = Attention(d, heads, hd, site=f"{site}.attn2", rngs=rngs, kv_dim=cfg.cross_attention_dim,
                               bias=cfg.attention_bias)
        self.ff = FeedForward(d, site=f"{site}.ff", rngs=rngs, approximate=cfg.activation_fn == "gelu-approximate")
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (6, d)) / d**0.5)

    def __call__(self, x, text, text_mask, t6, quant=None):
        b, _, d = x.shape
        mod = self.scale_shift_table[...].astype(x.dtype)[None] + t6.reshape(b, 6, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa, quant=quant)
        x = x + self.attn2(x, text, text_mask, quant=quant)  # PixArt: no norm before cross-attention
        return x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp, quant)


class AdaLNSingleEmbeddings(nnx.Module):
    """diffusers' ``PixArtAlphaCombinedTimestepSizeEmbeddings`` (timestep + optional size/aspect-ratio)."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        site = "adaln_single.emb"
        self.timestep_embedder = TwoLayer(256, d, site=f"{site}.timestep_embedder", rngs=rngs)
        if cfg.use_additional_conditions:
            self.resolution_embedder = TwoLayer(256, d // 3, site=f"{site}.resolution_embedder", rngs=rngs)
            self.aspect_ratio_embedder = TwoLayer(256, d // 3, site=f"{site}.aspect_ratio_embedder", rngs=rngs)
        else:
            self.resolution_embedder = self.aspect_ratio_embedder = None

    def __call__(self, t, resolution, aspect_ratio, dtype, quant=None):
        feats = lambda v: layers.timestep_embedding(jnp.reshape(v, (-1,)), 256).astype(dtype)  # noqa: E731
        emb = self.timestep_embedder(feats(t), quant)
        if self.resolution_embedder is not None:
            b = emb.shape[0]
            res = self.resolution_embedder(feats(resolution), quant).reshape(b, -1)
            ar = self.aspect_ratio_embedder(feats(aspect_ratio), quant).reshape(b, -1)
            emb = emb + jnp.concatenate([res, ar], axis=1)
        return emb


class AdaLNSingle(nnx.Module):
    """diffusers' ``AdaLayerNormSingle``: the embedding and one shared ``linear(silu(emb))`` → 6·hidden."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.emb = AdaLNSingleEmbeddings(cfg, rngs=rngs)
        self.linear = Linear(cfg.inner_dim, 6 * cfg.inner_dim, site="adaln_single.linear", rngs=rngs)


class PixArtTransformer(nnx.Module):
    """PixArt-Σ / PixArt-α transformer; see the module docstring for inputs, outputs and sites."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        d, p = cfg.inner_dim, cfg.patch_size
        self.config = cfg
        self.pos_embed = PatchEmbedding(cfg.in_channels, p, d, rngs=rngs)
        self.adaln_single = AdaLNSingle(cfg, rngs=rngs)
        self.caption_projection = (TwoLayer(cfg.caption_channels, d, site="caption_projection", rngs=rngs,
                                            act="gelu_tanh") if cfg.caption_channels is not None else None)
        self.transformer_blocks = nnx.List([PixArtBlock(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (2, d)) / d**0.5)
        self.proj_out = Linear(d, p * p * cfg.out_channels, site="proj_out", rngs=rngs)

    def __call__(self, x, t, text_emb, mask=None, resolution=None, aspect_ratio=None, *, quant=None):
        """Noise (and variance) prediction for NHWC latents ``x`` at timesteps ``t`` given T5 ``text_emb``.

        ``mask`` (B, L): 1/True keeps a text token (``None`` keeps all). With
        ``use_additional_conditions``, ``resolution`` (B, 2) is the image (height, width) in
        pixels and ``aspect_ratio`` (B,) or (B, 1) its height/width; when omitted they default, as
        in diffusers' PixArt-α pipeline, to 8× the latent size and its ratio. They are positional
        (arrays), so ``Model.__call__``, whose keyword arguments are static, can pass them.
        """
        cfg = self.config
        p = cfg.patch_size
        dtype = jnp.dtype(cfg.dtype)
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"PixArt: x must be (B, H, W, {cfg.in_channels}) channels-last, got {tuple(x.shape)}")
        b, hh, ww, _ = x.shape
        if text_emb.ndim != 3 or text_emb.shape[0] != b:
            raise ValueError(f"PixArt: text_emb must be (B={b}, L, {cfg.caption_channels or cfg.cross_attention_dim}),"
                             f" got {tuple(text_emb.shape)}")
        gh, gw = hh // p, ww // p

        pos = layers.sincos_pos_embed_2d(cfg.inner_dim, gh, gw, base_size=cfg.sample_size // p,
                                         interpolation_scale=cfg.interpolation_scale)
        h = self.pos_embed(x.astype(dtype), pos, quant)

        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(t, jnp.float32), (-1,)), (b,))
        if cfg.use_additional_conditions:
            if resolution is None:
                resolution = jnp.broadcast_to(jnp.asarray([hh * 8.0, ww * 8.0], jnp.float32), (b, 2))
            if aspect_ratio is None:
                aspect_ratio = jnp.full((b, 1), hh / ww, jnp.float32)
        emb = self.adaln_single.emb(t, resolution, aspect_ratio, dtype, quant)
        t6 = self.adaln_single.linear(jax.nn.silu(emb), quant)

        text = text_emb.astype(dtype)
        if self.caption_projection is not None:
            text = self.caption_projection(text, quant)
        text_mask = None
        if mask is not None:
            keep = jnp.asarray(mask) > 0.5
            # diffusers adds a -10000 bias to masked keys; with every key of a row masked the bias
            # cancels in the softmax and the row attends to all tokens. Reproduce that.
            keep = keep | ~jnp.any(keep, axis=-1, keepdims=True)
            text_mask = keep[:, None, None, :]  # (B, 1, 1, L)

        for block in self.transformer_blocks:
            h = block(h, text, text_mask, t6, quant)

        shift, scale = jnp.split(self.scale_shift_table[...].astype(dtype)[None] + emb[:, None], 2, axis=1)
        h = layer_norm(h, eps=1e-6) * (1 + scale) + shift
        return unpatchify(self.proj_out(h, quant), p, gh, gw)


def build(config: Config | Mapping[str, Any], rngs: nnx.Rngs) -> PixArtTransformer:
    """The PixArt module for ``config`` (a :class:`Config` or a dict) with random params from ``rngs``."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return PixArtTransformer(cfg, rngs=rngs)


def from_config(config: Config, key=None, abstract: bool = False) -> Model:
    """A :class:`~jdq.models.base.Model` of ``config``: random params from ``key``, or abstract ones."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return Model.abstract(cfg, build) if abstract else Model.create(cfg, build, key)


#: Text tokens of a PixArt-Σ caption (T5-XXL, padded to 300), for tracing a call.
TEXT_TOKENS = 300

SPEC = FamilySpec(
    name=FAMILY,
    denoise=lambda model, params, x, t, cond, quant=None: model.apply(params, x, t, cond["text_emb"], cond.get("mask"),
                                                                      quant=quant),
    sample_shape=lambda cfg: (cfg.sample_size, cfg.sample_size, cfg.in_channels),
    defaults={"sampler": "dpm++2m", "steps": 20, "guidance": 4.5},
    abstract_inputs=lambda cfg, b: (abstract_array((b, cfg.sample_size, cfg.sample_size, cfg.in_channels)),
                                    abstract_array((b,)), abstract_array((b, TEXT_TOKENS, cfg.caption_channels))),
    text_keys=(("text_emb",), ("mask",)),
    configs={"pixart-sigma": NamedConfig(FAMILY, lambda: PIXART_SIGMA_XL_2_1024_MS, 20,
                                         "PixArt-Sigma-XL/2, 1024x1024 (latent 128x128x4, 4096 tokens), 300 T5 tokens")},
)
