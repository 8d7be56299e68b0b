"""SD3 / SD3.5 MMDiT as diffusers' ``SD3Transformer2DModel``, as a pure function of params.

``model(x, t, text_emb, pooled)``: NHWC latents ``x`` (B, H, W, C), timesteps ``t`` (B,) (the
flow-matching σ·1000, float; or a scalar), the joint text embeddings ``text_emb``
(B, L, joint_attention_dim) (CLIP-L ‖ CLIP-G padded, then T5) and the pooled CLIP embeddings
``pooled`` (B, pooled_projection_dim). Returns the NHWC velocity (B, H, W, out_channels). The
compute dtype is ``Config.dtype``.

Blocks are MMDiT blocks: the image and text streams have their own adaLN-Zero modulation,
projections and MLPs and meet in one joint attention over the concatenated [image; text]
tokens; the last block is "context pre-only" (its text stream only feeds keys and values).
SD3.5 adds RMS QK-norm and, in ``dual_attention_layers``, a second image-only attention.

Quantization sites are diffusers' module paths (and the params paths of the layers):

=========================================================  ====================================  ============
site                                                       what                                  input role
=========================================================  ====================================  ============
``pos_embed.proj``                                         patch embedding (p×p stride-p conv)    ``act``
``time_text_embed.timestep_embedder.linear_1/_2``          timestep MLP (SiLU)                    ``act``
``time_text_embed.text_embedder.linear_1/_2``              pooled-text MLP (SiLU)                 ``act``
``context_embedder``                                       text → hidden                          ``act``
``transformer_blocks.{i}.norm1.linear``                    image adaLN-Zero (6, or 9 with attn2)  ``act``
``transformer_blocks.{i}.norm1_context.linear``            text adaLN-Zero (2 in the last block)  ``act``
``transformer_blocks.{i}.attn.to_q/to_k/to_v``             image-stream q/k/v                     ``act``
``transformer_blocks.{i}.attn.add_q_proj/add_k_proj/add_v_proj``  text-stream q/k/v               ``act``
``transformer_blocks.{i}.attn.qk`` / ``.pv``               joint attention matmuls (q, k / attn_prob, v)
``transformer_blocks.{i}.attn.to_out.0``                   image-stream output                    ``act``
``transformer_blocks.{i}.attn.to_add_out``                 text-stream output (not the last)      ``act``
``transformer_blocks.{i}.attn2.to_q/to_k/to_v/to_out.0``   SD3.5 image-only attention             ``act``
``transformer_blocks.{i}.attn2.qk`` / ``.pv``              its matmuls
``transformer_blocks.{i}.ff.net.0.proj`` / ``ff.net.2``    image MLP                              ``act`` / ``post_gelu``
``transformer_blocks.{i}.ff_context.net.0.proj`` / ``.net.2``  text MLP (not the last block)      ``act`` / ``post_gelu``
``norm_out.linear``                                        final adaLN (scale, shift)             ``act``
``proj_out``                                               tokens → patches                       ``act``
=========================================================  ====================================  ============

diffusers keeps the sin-cos position table (``pos_embed_max_size``² positions) in the
checkpoint as a buffer; jdq computes the (centre-cropped) part a latent needs from the config,
and the converter checks the checkpoint's table against it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdq.models import layers
from jdq.models.base import ConfigBase, Model
from jdq.models.spec import FamilySpec, NamedConfig, abstract_array
from jdq.models.layers import (
    Attention,
    FeedForward,
    Linear,
    PatchEmbedding,
    TwoLayer,
    head_norm,
    layer_norm,
    merge_heads,
    split_heads,
    unpatchify,
)

FAMILY = "sd3"

_QK_NORMS = (None, "rms_norm", "layer_norm")

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config(ConfigBase):
    """An SD3 transformer's hyper-parameters (diffusers' ``SD3Transformer2DModel`` arguments).

    Defaults are diffusers'; :data:`SD3_MEDIUM` and :data:`SD35_MEDIUM` are published
    configurations. ``dual_attention_layers`` lists the blocks with a second, image-only
    attention (SD3.5-medium: 0…12); ``qk_norm`` is ``None``, ``"rms_norm"`` (SD3.5) or
    ``"layer_norm"``. ``dtype`` is the compute dtype (inputs are cast to it).
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        if self.qk_norm not in _QK_NORMS:
            raise ValueError(f"SD3 config: qk_norm={self.qk_norm!r} is not supported; expected one of {_QK_NORMS}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"SD3 config: caption_projection_dim ({self.caption_projection_dim}) must equal the "
                             f"hidden size heads×head_dim ({self.inner_dim}): both streams share the blocks")
        if self.inner_dim % 4:
            raise ValueError(f"SD3 config: hidden size {self.inner_dim} must be divisible by 4 (2-D sin-cos positions)")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"SD3 config: dual_attention_layers {bad} out of range for num_layers={self.num_layers}")
        jnp.dtype(self.dtype)  # raises on an unknown dtype name

    @property
    def inner_dim(self) -> int:
        """Hidden size: heads × head dimension."""
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """From a jdq config dict or a diffusers ``config.json`` dict (``_``-keys ignored; unknown keys raise)."""
        return super().from_dict({k: v for k, v in d.items() if not k.startswith("_")})


#: SD3-medium (``stabilityai/stable-diffusion-3-medium-diffusers``, transformer/config.json):
#: 24 layers, 24 heads × 64, pos_embed_max_size 192. 2,028,328,000 parameters: diffusers'
#: ``SD3Transformer2DModel(**this)`` built on the meta device, ``sum(p.numel() for p in
#: model.parameters())`` (the SD3 paper's "2B"); its checkpoint also stores the 192²×1536
#: position table as a buffer, which jdq computes instead.
SD3_MEDIUM = Config(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)

#: SD3.5-medium (``stabilityai/stable-diffusion-3.5-medium``, transformer/config.json): SD3-medium's
#: shape with RMS QK-norm, dual attention in blocks 0…12 and pos_embed_max_size 384.
SD35_MEDIUM = dataclasses.replace(SD3_MEDIUM, pos_embed_max_size=384, qk_norm="rms_norm",
                                  dual_attention_layers=tuple(range(13)))


def position_table(cfg: Config, rows=None, cols=None) -> np.ndarray:
    """The sin-cos position embedding of diffusers' SD3 ``PatchEmbed``, (len(rows)·len(cols), hidden) float32.

    ``rows``/``cols`` are patch-grid indices into the ``pos_embed_max_size``² table (default: all);
    without ``pos_embed_max_size`` the table is the ``sample_size / patch`` grid's.
    """
    p = cfg.patch_size
    base = cfg.sample_size // p
    m = cfg.pos_embed_max_size or base
    rows = np.arange(m) if rows is None else np.asarray(rows)
    cols = np.arange(m) if cols is None else np.asarray(cols)
    # Positions as diffusers computes them: float32 arange / (grid / base_size) / interpolation (1).
    scale = np.float32(m / base)
    pr = rows.astype(np.float32) / scale
    pc = cols.astype(np.float32) / scale
    cw, rh = np.meshgrid(pc, pr)  # (len(rows), len(cols)) each
    d = cfg.inner_dim
    emb = np.concatenate([layers.sincos_pos_embed_1d(d // 2, cw), layers.sincos_pos_embed_1d(d // 2, rh)], axis=1)
    return emb.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class AdaLN(nnx.Module):
    """The ``linear(silu(temb))`` of diffusers' adaptive norms, split into ``chunks`` (B, 1, D) pieces."""

    def __init__(self, dim: int, chunks: int, *, site: str, rngs: nnx.Rngs):
        self.chunks = chunks
        self.linear = Linear(dim, chunks * dim, site=f"{site}.linear", rngs=rngs)

    def __call__(self, temb, quant=None):
        return jnp.split(self.linear(jax.nn.silu(temb), quant)[:, None, :], self.chunks, axis=-1)


class JointAttention(Attention):
    """diffusers' ``Attention`` with ``JointAttnProcessor2_0`` and ``added_kv_proj_dim``.

    The text stream has its own projections (``add_q_proj``/``add_k_proj``/``add_v_proj``, QK-norm
    ``norm_added_q``/``norm_added_k``); both streams attend over their concatenation (one site)
    and get their own output projection (``to_out.0``, ``to_add_out`` unless context-pre-only).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, site: str, rngs: nnx.Rngs,
                 context_pre_only: bool, qk_norm: str | None = None):
        super().__init__(dim, heads, head_dim, site=site, rngs=rngs, qk_norm=qk_norm)
        inner = heads * head_dim
        self.add_q_proj = Linear(dim, inner, site=f"{site}.add_q_proj", rngs=rngs)
        self.add_k_proj = Linear(dim, inner, site=f"{site}.add_k_proj", rngs=rngs)
        self.add_v_proj = Linear(dim, inner, site=f"{site}.add_v_proj", rngs=rngs)
        self.to_add_out = None if context_pre_only else Linear(inner, dim, site=f"{site}.to_add_out", rngs=rngs)
        self.norm_added_q = head_norm(head_dim, qk_norm, site=site)
        self.norm_added_k = head_norm(head_dim, qk_norm, site=site)

    def __call__(self, x, context, quant=None):
        q, k, v = self.project(x, quant=quant)
        cq = split_heads(self.add_q_proj(context, quant), self.heads)
        ck = split_heads(self.add_k_proj(context, quant), self.heads)
        cv = split_heads(self.add_v_proj(context, quant), self.heads)
        if self.norm_added_q is not None:
            cq, ck = self.norm_added_q(cq), self.norm_added_k(ck)
        n = x.shape[1]
        out = layers.attention(jnp.concatenate([q, cq], axis=1), jnp.concatenate([k, ck], axis=1),
                               jnp.concatenate([v, cv], axis=1), site=self.site, quant=quant)
        out = merge_heads(out)
        x_out = self.to_out["0"](out[:, :n], quant)
        c_out = None if self.to_add_out is None else self.to_add_out(out[:, n:], quant)
        return x_out, c_out


class JointBlock(nnx.Module):
    """diffusers' ``JointTransformerBlock`` (MMDiT block; SD3.5 dual attention and QK-norm optional)."""

    def __init__(self, cfg: Config, index: int, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        site = f"transformer_blocks.{index}"
        heads, hd = cfg.num_attention_heads, cfg.attention_head_dim
        self.context_pre_only = index == cfg.num_layers - 1
        self.dual = index in cfg.dual_attention_layers
        self.norm1 = AdaLN(d, 9 if self.dual else 6, site=f"{site}.norm1", rngs=rngs)
        self.norm1_context = AdaLN(d, 2 if self.context_pre_only else 6, site=f"{site}.norm1_context", rngs=rngs)
        self.attn = JointAttention(d, heads, hd, site=f"{site}.attn", rngs=rngs,
                                   context_pre_only=self.context_pre_only, qk_norm=cfg.qk_norm)
        self.attn2 = Attention(d, heads, hd, site=f"{site}.attn2", rngs=rngs, qk_norm=cfg.qk_norm) if self.dual else None
        self.ff = FeedForward(d, site=f"{site}.ff", rngs=rngs)
        self.ff_context = None if self.context_pre_only else FeedForward(d, site=f"{site}.ff_context", rngs=rngs)

    def __call__(self, x, c, temb, quant=None):
        mods = self.norm1(temb, quant)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        xn = layer_norm(x, eps=1e-6)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(temb, quant)  # AdaLayerNormContinuous: scale first
            ch = layer_norm(c, eps=1e-6) * (1 + c_scale) + c_shift
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb, quant)
            ch = layer_norm(c, eps=1e-6) * (1 + c_scale_msa) + c_shift_msa

        attn_out, c_attn_out = self.attn(xn * (1 + scale_msa) + shift_msa, ch, quant)
        x = x + gate_msa * attn_out
        if self.dual:  # SD35AdaLayerNormZeroX: the second attention reads the same LN(x), modulated apart
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = x + gate_msa2 * self.attn2(xn * (1 + scale_msa2) + shift_msa2, quant=quant)
        x = x + gate_mlp * self.ff(layer_norm(x, eps=1e-6) * (1 + scale_mlp) + shift_mlp, quant)

        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa * c_attn_out
        c = c + c_gate_mlp * self.ff_context(layer_norm(c, eps=1e-6) * (1 + c_scale_mlp) + c_shift_mlp, quant)
        return x, c


class TimeTextEmbed(nnx.Module):
    """diffusers' ``CombinedTimestepTextProjEmbeddings``: timestep MLP + pooled-text MLP, summed."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.timestep_embedder = TwoLayer(256, d, site="time_text_embed.timestep_embedder", rngs=rngs)
        self.text_embedder = TwoLayer(cfg.pooled_projection_dim, d, site="time_text_embed.text_embedder",
                                      rngs=rngs, act="silu")

    def __call__(self, t, pooled, quant=None):
        feats = layers.timestep_embedding(t, 256).astype(pooled.dtype)
        return self.timestep_embedder(feats, quant) + self.text_embedder(pooled, quant)


class SD3Transformer(nnx.Module):
    """SD3 / SD3.5 MMDiT; see the module docstring for inputs, outputs and sites."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        d, p = cfg.inner_dim, cfg.patch_size
        self.config = cfg
        self.pos_embed = PatchEmbedding(cfg.in_channels, p, d, rngs=rngs)
        self.time_text_embed = TimeTextEmbed(cfg, rngs=rngs)
        self.context_embedder = Linear(cfg.joint_attention_dim, cfg.caption_projection_dim, site="context_embedder",
                                       rngs=rngs)
        self.transformer_blocks = nnx.List([JointBlock(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm_out = AdaLN(d, 2, site="norm_out", rngs=rngs)
        self.proj_out = Linear(d, p * p * cfg.out_channels, site="proj_out", rngs=rngs)

    def _positions(self, gh: int, gw: int) -> np.ndarray:
        cfg = self.config
        m = cfg.pos_embed_max_size
        if m is None:  # diffusers recomputes the table for the grid (base size sample_size / patch)
            return layers.sincos_pos_embed_2d(cfg.inner_dim, gh, gw, base_size=cfg.sample_size // cfg.patch_size)
        if gh > m or gw > m:
            raise ValueError(f"SD3: a {gh}×{gw} patch grid exceeds pos_embed_max_size={m}")
        top, left = (m - gh) // 2, (m - gw) // 2  # diffusers' centre crop
        return position_table(cfg, np.arange(top, top + gh), np.arange(left, left + gw))

    def __call__(self, x, t, text_emb, pooled, *, quant=None):
        """Flow-matching velocity for NHWC latents ``x`` at timesteps ``t`` given text and pooled embeddings."""
        cfg = self.config
        p = cfg.patch_size
        dtype = jnp.dtype(cfg.dtype)
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"SD3: x must be (B, H, W, {cfg.in_channels}) channels-last, got {tuple(x.shape)}")
        b, hh, ww, _ = x.shape
        if text_emb.ndim != 3 or text_emb.shape[0] != b or text_emb.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(f"SD3: text_emb must be (B={b}, L, {cfg.joint_attention_dim}), got {tuple(text_emb.shape)}")
        if pooled.shape != (b, cfg.pooled_projection_dim):
            raise ValueError(f"SD3: pooled must be (B={b}, {cfg.pooled_projection_dim}), got {tuple(pooled.shape)}")
        gh, gw = hh // p, ww // p

        h = self.pos_embed(x.astype(dtype), self._positions(gh, gw), quant)
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(t, jnp.float32), (-1,)), (b,))
        temb = self.time_text_embed(t, pooled.astype(dtype), quant)
        c = self.context_embedder(text_emb.astype(dtype), quant)

        for block in self.transformer_blocks:
            h, c = block(h, c, temb, quant)

        scale, shift = self.norm_out(temb, quant)  # AdaLayerNormContinuous: scale first
        h = layer_norm(h, eps=1e-6) * (1 + scale) + shift
        return unpatchify(self.proj_out(h, quant), p, gh, gw)


def build(config: Config | Mapping[str, Any], rngs: nnx.Rngs) -> SD3Transformer:
    """The SD3 module for ``config`` (a :class:`Config` or a dict) with random params from ``rngs``."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return SD3Transformer(cfg, rngs=rngs)


def from_config(config: Config, key=None, abstract: bool = False) -> Model:
    """A :class:`~jdq.models.base.Model` of ``config``: random params from ``key``, or abstract ones."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return Model.abstract(cfg, build) if abstract else Model.create(cfg, build, key)


#: Text tokens of an SD3 prompt for tracing a call: 77 CLIP-L/G tokens (padded to 4096 wide) + 256 T5-XXL tokens.
TEXT_TOKENS = 333

SPEC = FamilySpec(
    name=FAMILY,
    denoise=lambda model, params, x, t, cond, quant=None: model.apply(params, x, t, cond["text_emb"], cond["pooled"],
                                                                      quant=quant),
    sample_shape=lambda cfg: (cfg.sample_size, cfg.sample_size, cfg.in_channels),
    defaults={"sampler": "euler", "steps": 28, "guidance": 7.0, "shift": 3.0},
    abstract_inputs=lambda cfg, b: (abstract_array((b, cfg.sample_size, cfg.sample_size, cfg.in_channels)),
                                    abstract_array((b,)), abstract_array((b, TEXT_TOKENS, cfg.joint_attention_dim)),
                                    abstract_array((b, cfg.pooled_projection_dim))),
    flow=True,
    text_keys=(("text_emb", "pooled"), ()),
    configs={"sd3-medium": NamedConfig(FAMILY, lambda: SD3_MEDIUM, 28,
                                       "SD3-medium MMDiT, 1024x1024 (latent 128x128x16, 4096 tokens), 333 text tokens")},
)
