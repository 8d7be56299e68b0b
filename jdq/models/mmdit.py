"""SD3 / SD3.5 MMDiT as diffusers' ``SD3Transformer2DModel``, in Flax NNX.

The forward is ``model(x, t, text_emb, pooled, *, quant=None)`` with NHWC latents ``x``
(B, H, W, C), timesteps ``t`` (B,) (the flow-matching σ·1000, float), the joint text
embeddings ``text_emb`` (B, L, joint_attention_dim) (CLIP-L/G ‖ T5) and the pooled CLIP
embeddings ``pooled`` (B, pooled_projection_dim). It returns the NHWC velocity
(B, H, W, out_channels).

Quantization sites are diffusers' module paths. Linear layers (role ``act``; ``weight``)::

    pos_embed.proj                                     patch embedding (p×p stride-p conv)
    time_text_embed.timestep_embedder.linear_1 / .linear_2
    time_text_embed.text_embedder.linear_1 / .linear_2 pooled-text MLP (SiLU)
    context_embedder                                   text → hidden
    transformer_blocks.{i}.norm1.linear                adaLN-Zero of the image stream (6 or 9 chunks)
    transformer_blocks.{i}.norm1_context.linear        adaLN of the text stream (2 chunks in the last block)
    transformer_blocks.{i}.attn.to_q / to_k / to_v     image-stream projections of the joint attention
    transformer_blocks.{i}.attn.add_q_proj / add_k_proj / add_v_proj   text-stream projections
    transformer_blocks.{i}.attn.to_out.0               image-stream output
    transformer_blocks.{i}.attn.to_add_out             text-stream output (not in the last block)
    transformer_blocks.{i}.attn2.to_q / to_k / to_v / to_out.0   SD3.5 dual (image-only) attention
    transformer_blocks.{i}.ff.net.0.proj / ff.net.2    image MLP (net.2's input: post_gelu)
    transformer_blocks.{i}.ff_context.net.0.proj / ff_context.net.2    text MLP (not in the last block)
    norm_out.linear
    proj_out

and the attention matmuls ``transformer_blocks.{i}.attn.qk`` / ``.attn.pv`` (joint attention over
the concatenated [image; text] tokens) and, in dual-attention blocks,
``transformer_blocks.{i}.attn2.qk`` / ``.attn2.pv``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdq.models import layers
from jdq.models.pixart import (
    FeedForward,
    Linear,
    TextProjection,
    TimestepEmbedding,
    layer_norm,
    merge_heads,
    patchify,
    sincos_pos_embed_2d,
    split_heads,
    timestep_features,
    unpatchify,
)

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

_QK_NORMS = (None, "rms_norm", "layer_norm")


@dataclasses.dataclass(frozen=True)
class Config:
    """An SD3 transformer's hyper-parameters (diffusers' ``SD3Transformer2DModel`` arguments).

    Defaults are diffusers'; :data:`SD3_MEDIUM` and :data:`SD35_MEDIUM` are published
    configurations. ``dual_attention_layers`` lists the blocks with an extra image-only
    attention (SD3.5-medium: 0…12); ``qk_norm`` is ``None``, ``"rms_norm"`` (SD3.5) or
    ``"layer_norm"``.
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

    def __post_init__(self):
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        if self.qk_norm not in _QK_NORMS:
            raise ValueError(f"SD3 Config: qk_norm={self.qk_norm!r} is not supported; expected one of {_QK_NORMS}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"SD3 Config: caption_projection_dim ({self.caption_projection_dim}) must equal the "
                             f"hidden size heads×head_dim ({self.inner_dim}): both streams share the blocks")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"SD3 Config: dual_attention_layers {bad} out of range for num_layers={self.num_layers}")

    @property
    def inner_dim(self) -> int:
        """Hidden size: heads × head dimension."""
        return self.num_attention_heads * self.attention_head_dim

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-serialisable dict (``from_dict`` inverts it)."""
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """Build from a jdq config dict or a diffusers ``config.json`` dict (``_``-keys ignored; unknown keys raise)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key.startswith("_"):
                continue
            if key not in fields:
                raise ValueError(f"SD3 Config: unknown key {key!r}")
            kwargs[key] = tuple(value) if key == "dual_attention_layers" else value
        return cls(**kwargs)


#: SD3-medium (``stabilityai/stable-diffusion-3-medium-diffusers``, transformer/config.json):
#: 24 layers, 24 heads × 64, pos_embed_max_size 192. 2,028,328,000 parameters (diffusers'
#: ``SD3Transformer2DModel`` built from it on the meta device; the "2B" of the SD3 paper), plus
#: the 192²×1536 = 56,623,104-entry sin-cos position table stored in the checkpoint as a buffer.
SD3_MEDIUM = Config(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)

#: SD3.5-medium (``stabilityai/stable-diffusion-3.5-medium``, transformer/config.json): SD3-medium's
#: shape with RMS QK-norm, dual attention in blocks 0…12 and pos_embed_max_size 384.
SD35_MEDIUM = dataclasses.replace(SD3_MEDIUM, pos_embed_max_size=384, qk_norm="rms_norm",
                                  dual_attention_layers=tuple(range(13)))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class PosEmbedTable(nnx.Variable):
    """A fixed (non-trained) position-embedding table that the checkpoint stores (a torch buffer)."""


class HeadNorm(nnx.Module):
    """QK normalisation over the head dimension: RMSNorm or LayerNorm with a learned weight (eps 1e-6)."""

    def __init__(self, head_dim: int, kind: str, eps: float = 1e-6):
        self.kind = kind
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((head_dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((head_dim,), jnp.float32)) if kind == "layer_norm" else None

    def __call__(self, x):
        if self.kind == "rms_norm":
            x32 = x.astype(jnp.float32)
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
            return (y.astype(x.dtype) * self.weight[...].astype(x.dtype)).astype(x.dtype)
        y = layer_norm(x, self.eps)
        return y * self.weight[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class JointAttention(nnx.Module):
    """diffusers' ``Attention`` with ``JointAttnProcessor2_0``.

    With ``joint=True`` the text stream has its own q/k/v projections (``add_*_proj``) and both
    streams attend over their concatenation; otherwise it is plain self-attention (SD3.5's attn2).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, site: str, rngs: nnx.Rngs, joint: bool,
                 context_pre_only: bool = False, qk_norm: str | None = None):
        inner = heads * head_dim
        self.heads = heads
        self.site = site
        self.to_q = Linear(dim, inner, site=f"{site}.to_q", rngs=rngs)
        self.to_k = Linear(dim, inner, site=f"{site}.to_k", rngs=rngs)
        self.to_v = Linear(dim, inner, site=f"{site}.to_v", rngs=rngs)
        self.to_out = Linear(inner, dim, site=f"{site}.to_out.0", rngs=rngs)
        self.norm_q = HeadNorm(head_dim, qk_norm) if qk_norm else None
        self.norm_k = HeadNorm(head_dim, qk_norm) if qk_norm else None
        self.joint = joint
        if joint:
            self.add_q_proj = Linear(dim, inner, site=f"{site}.add_q_proj", rngs=rngs)
            self.add_k_proj = Linear(dim, inner, site=f"{site}.add_k_proj", rngs=rngs)
            self.add_v_proj = Linear(dim, inner, site=f"{site}.add_v_proj", rngs=rngs)
            self.to_add_out = None if context_pre_only else Linear(inner, dim, site=f"{site}.to_add_out", rngs=rngs)
            self.norm_added_q = HeadNorm(head_dim, qk_norm) if qk_norm else None
            self.norm_added_k = HeadNorm(head_dim, qk_norm) if qk_norm else None

    def _qkv(self, x, pq, pk, pv, nq, nk, quant):
        q = split_heads(pq(x, quant), self.heads)
        k = split_heads(pk(x, quant), self.heads)
        v = split_heads(pv(x, quant), self.heads)
        if nq is not None:
            q, k = nq(q), nk(k)
        return q, k, v

    def __call__(self, x, context=None, quant=None):
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, quant)
        if not self.joint:
            out = layers.attention(q, k, v, site=self.site, quant=quant)
            return self.to_out(merge_heads(out), quant)
        cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                               self.norm_added_q, self.norm_added_k, quant)
        n = x.shape[1]
        out = layers.attention(jnp.concatenate([q, cq], axis=1), jnp.concatenate([k, ck], axis=1),
                               jnp.concatenate([v, cv], axis=1), site=self.site, quant=quant)
        out = merge_heads(out)
        x_out = self.to_out(out[:, :n], quant)
        c_out = None if self.to_add_out is None else self.to_add_out(out[:, n:], quant)
        return x_out, c_out


class AdaLNLinear(nnx.Module):
    """The ``linear(silu(temb))`` of diffusers' adaptive norms, split into ``chunks`` (B, 1, D) pieces."""

    def __init__(self, dim: int, chunks: int, *, site: str, rngs: nnx.Rngs):
        self.chunks = chunks
        self.linear = Linear(dim, chunks * dim, site=f"{site}.linear", rngs=rngs)

    def __call__(self, temb, quant=None):
        return jnp.split(self.linear(jax.nn.silu(temb), quant)[:, None, :], self.chunks, axis=-1)


class JointBlock(nnx.Module):
    """diffusers' ``JointTransformerBlock`` (MMDiT block; SD3.5 dual attention and QK-norm optional)."""

    def __init__(self, cfg: Config, index: int, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        site = f"transformer_blocks.{index}"
        self.context_pre_only = index == cfg.num_layers - 1
        self.dual = index in cfg.dual_attention_layers
        self.norm1 = AdaLNLinear(d, 9 if self.dual else 6, site=f"{site}.norm1", rngs=rngs)
        self.norm1_context = AdaLNLinear(d, 2 if self.context_pre_only else 6, site=f"{site}.norm1_context",
                                         rngs=rngs)
        heads, hd = cfg.num_attention_heads, cfg.attention_head_dim
        self.attn = JointAttention(d, heads, hd, site=f"{site}.attn", rngs=rngs, joint=True,
                                   context_pre_only=self.context_pre_only, qk_norm=cfg.qk_norm)
        self.attn2 = (JointAttention(d, heads, hd, site=f"{site}.attn2", rngs=rngs, joint=False, qk_norm=cfg.qk_norm)
                      if self.dual else None)
        self.ff = FeedForward(d, site=f"{site}.ff", rngs=rngs)
        self.ff_context = None if self.context_pre_only else FeedForward(d, site=f"{site}.ff_context", rngs=rngs)

    def __call__(self, x, c, temb, quant=None):
        eps = 1e-6
        mods = self.norm1(temb, quant)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        xn = layer_norm(x, eps)
        h = xn * (1 + scale_msa) + shift_msa
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(temb, quant)  # AdaLayerNormContinuous: scale first
            ch = layer_norm(c, eps) * (1 + c_scale) + c_shift
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb, quant)
            ch = layer_norm(c, eps) * (1 + c_scale_msa) + c_shift_msa

        attn_out, c_attn_out = self.attn(h, ch, quant)
        x = x + gate_msa * attn_out
        if self.dual:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = x + gate_msa2 * self.attn2(xn * (1 + scale_msa2) + shift_msa2, quant=quant)
        x = x + gate_mlp * self.ff(layer_norm(x, eps) * (1 + scale_mlp) + shift_mlp, quant)

        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa * c_attn_out
        c = c + c_gate_mlp * self.ff_context(layer_norm(c, eps) * (1 + c_scale_mlp) + c_shift_mlp, quant)
        return x, c


class SD3Transformer(nnx.Module):
    """SD3 / SD3.5 MMDiT; see the module docstring for inputs, outputs and sites."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        p = cfg.patch_size
        self.config = cfg
        self.pos_embed_proj = Linear(p * p * cfg.in_channels, d, site="pos_embed.proj", rngs=rngs)
        if cfg.pos_embed_max_size:
            m = cfg.pos_embed_max_size
            table = sincos_pos_embed_2d(d, m, m, base_size=cfg.sample_size // p, interpolation_scale=1.0)
            self.pos_embed = nnx.Dict(pos_embed=PosEmbedTable(jnp.asarray(table)[None]))
        else:
            self.pos_embed = None
        self.timestep_embedder = TimestepEmbedding(256, d, site="time_text_embed.timestep_embedder", rngs=rngs)
        self.text_embedder = TextProjection(cfg.pooled_projection_dim, d, site="time_text_embed.text_embedder",
                                            rngs=rngs, act="silu")
        self.context_embedder = Linear(cfg.joint_attention_dim, cfg.caption_projection_dim, site="context_embedder",
                                       rngs=rngs)
        self.transformer_blocks = nnx.List([JointBlock(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm_out = AdaLNLinear(d, 2, site="norm_out", rngs=rngs)
        self.proj_out = Linear(d, p * p * cfg.out_channels, site="proj_out", rngs=rngs)

    def _positions(self, gh: int, gw: int):
        cfg = self.config
        if self.pos_embed is None:
            return jnp.asarray(sincos_pos_embed_2d(cfg.inner_dim, gh, gw, base_size=cfg.sample_size // cfg.patch_size,
                                                   interpolation_scale=1.0))[None]
        m = cfg.pos_embed_max_size
        if gh > m or gw > m:
            raise ValueError(f"SD3: a {gh}×{gw} patch grid exceeds pos_embed_max_size={m}")
        top, left = (m - gh) // 2, (m - gw) // 2
        table = self.pos_embed["pos_embed"][...].reshape(1, m, m, -1)
        return table[:, top:top + gh, left:left + gw, :].reshape(1, gh * gw, -1)

    def __call__(self, x, t, text_emb, pooled, *, quant=None):
        """Predict the flow-matching velocity for NHWC latents ``x`` at timesteps ``t``."""
        cfg = self.config
        p = cfg.patch_size
        b, hh, ww, ch = x.shape
        if ch != cfg.in_channels:
            raise ValueError(f"SD3: x has {ch} channels, the model expects in_channels={cfg.in_channels}")
        if hh % p or ww % p:
            raise ValueError(f"SD3: latent size {hh}×{ww} is not a multiple of the patch size {p}")
        dtype = x.dtype
        gh, gw = hh // p, ww // p

        tokens = self.pos_embed_proj(patchify(x, p), quant)
        h = (tokens.astype(jnp.float32) + self._positions(gh, gw).astype(jnp.float32)).astype(dtype)

        t = jnp.broadcast_to(jnp.asarray(t).reshape(-1), (b,))
        pooled = pooled.astype(dtype)
        temb = self.timestep_embedder(timestep_features(t).astype(dtype), quant) + self.text_embedder(pooled, quant)
        c = self.context_embedder(text_emb.astype(dtype), quant)

        for block in self.transformer_blocks:
            h, c = block(h, c, temb, quant)

        scale, shift = self.norm_out(temb, quant)
        h = layer_norm(h, 1e-6) * (1 + scale) + shift
        out = self.proj_out(h, quant)
        return unpatchify(out, gh, gw, p, cfg.out_channels)


def build(config: Config | Mapping[str, Any], rngs: nnx.Rngs) -> SD3Transformer:
    """The SD3 transformer for ``config`` (a :class:`Config` or a dict), randomly initialised."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return SD3Transformer(cfg, rngs=rngs)
