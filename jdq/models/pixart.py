"""PixArt-Σ (and PixArt-α) as diffusers' ``PixArtTransformer2DModel``, in Flax NNX.

The forward is ``model(x, t, text_emb, mask=None, *, resolution=None, aspect_ratio=None,
quant=None)`` with NHWC latents ``x`` (B, H, W, C), timesteps ``t`` (B,) (the DDPM index, 0…999),
T5 embeddings ``text_emb`` (B, L, caption_channels) and an optional text mask (B, L) (1 or True
keeps a token). It returns the NHWC prediction (B, H, W, out_channels) (noise and, for 8
output channels, the learned variance).

Quantization sites are diffusers' module paths, so a rule written for a PyTorch PixArt carries
over unchanged. Linear layers (role ``act`` for the input, ``weight`` for the weight)::

    pos_embed.proj                                  patch embedding (a p×p stride-p conv)
    caption_projection.linear_1 / .linear_2         T5 → hidden (linear_2's input: post_gelu)
    adaln_single.emb.timestep_embedder.linear_1 / .linear_2
    adaln_single.emb.resolution_embedder.linear_1 / .linear_2      (use_additional_conditions)
    adaln_single.emb.aspect_ratio_embedder.linear_1 / .linear_2    (use_additional_conditions)
    adaln_single.linear                             the shared adaLN-single modulation
    transformer_blocks.{i}.attn1.to_q / to_k / to_v / to_out.0      self-attention
    transformer_blocks.{i}.attn2.to_q / to_k / to_v / to_out.0      cross-attention (k, v from text)
    transformer_blocks.{i}.ff.net.0.proj            MLP fc1
    transformer_blocks.{i}.ff.net.2                 MLP fc2 (input role post_gelu)
    proj_out

and the two attention matmuls of each attention, ``transformer_blocks.{i}.attn1.qk`` /
``.attn1.pv`` and ``transformer_blocks.{i}.attn2.qk`` / ``.attn2.pv`` (roles q, k and
attn_prob, v; see :func:`jdq.models.layers.attention`).

The text mask is applied as a boolean mask (masked keys get probability 0); diffusers adds a
−10000 bias instead, which is the same softmax in float32 unless every token of a row is masked.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdq.models import layers

# --------------------------------------------------------------------------------------------
# Building blocks (shared with jdq.models.mmdit)
# --------------------------------------------------------------------------------------------


class Linear(nnx.Module):
    """A linear layer ``x @ kernel + bias`` whose matmul is the quantization site ``site``.

    ``kernel`` is stored (in_features, out_features); ``act_role`` is the role of its input
    (``"post_gelu"`` for the second linear of a GELU MLP).
    """

    def __init__(self, din: int, dout: int, *, site: str, rngs: nnx.Rngs, bias: bool = True,
                 act_role: str = "act", dtype=jnp.float32):
        std = 1.0 / math.sqrt(din)
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (din, dout), dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None
        self.site = site
        self.act_role = act_role

    def __call__(self, x, quant=None):
        b = None if self.bias is None else self.bias[...]
        return layers.qlinear(x, self.kernel[...], b, site=self.site, quant=quant, act_role=self.act_role)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (statistics in float32), with optional weight and bias."""

    def __init__(self, dim: int, *, eps: float, affine: bool, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), dtype)) if affine else None

    def __call__(self, x):
        y = layer_norm(x, self.eps)
        if self.weight is not None:
            y = y * self.weight[...].astype(y.dtype) + self.bias[...].astype(y.dtype)
        return y


def layer_norm(x, eps: float):
    """LayerNorm without affine parameters; statistics in float32, result in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def timestep_features(t, dim: int = 256, max_period: float = 10000.0):
    """diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``: [cos, sin] in float32.

    The frequencies are computed as diffusers computes them (float32 exponent, exp rounded to
    float32) so that large timesteps (t·freq up to ~1000 rad) agree to float32 rounding.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = jnp.asarray(t, jnp.float32).reshape(-1)[:, None] * jnp.asarray(freqs)[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float) -> np.ndarray:
    """diffusers' ``get_2d_sincos_pos_embed`` for a (grid_h, grid_w) grid, as a (grid_h·grid_w, dim) float32 table.

    Row-major over (h, w); the first half of the channels encodes the column, the second the row.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a hidden size divisible by 4, got {dim}")
    rows = np.arange(grid_h, dtype=np.float32) / np.float32(grid_h / base_size) / np.float32(interpolation_scale)
    cols = np.arange(grid_w, dtype=np.float32) / np.float32(grid_w / base_size) / np.float32(interpolation_scale)
    col_grid, row_grid = np.meshgrid(cols, rows, indexing="xy")  # each (grid_h, grid_w)

    def one_axis(pos):
        omega = np.arange(dim // 4, dtype=np.float64) / (dim / 4.0)
        omega = 1.0 / 10000**omega
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(col_grid), one_axis(row_grid)], axis=1).astype(np.float32)


def patchify(x, p: int):
    """(B, H, W, C) → (B, H/p·W/p, p·p·C) tokens, row-major over patches, (py, px, c) inside."""
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"latent height and width {h}×{w} must be multiples of the patch size {p}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, h: int, w: int, p: int, c: int):
    """Inverse of :func:`patchify`: (B, h·w, p·p·c) → (B, h·p, w·p, c)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


class FeedForward(nnx.Module):
    """diffusers' ``FeedForward`` with a GELU (tanh or exact): ``net.0.proj`` → GELU → ``net.2``."""

    def __init__(self, dim: int, *, site: str, rngs: nnx.Rngs, mult: int = 4, approximate: bool = True,
                 dim_out: int | None = None):
        inner = dim * mult
        self.fc1 = Linear(dim, inner, site=f"{site}.net.0.proj", rngs=rngs)
        self.fc2 = Linear(inner, dim if dim_out is None else dim_out, site=f"{site}.net.2", rngs=rngs,
                          act_role="post_gelu")
        self.approximate = approximate

    def __call__(self, x, quant=None):
        h = jax.nn.gelu(self.fc1(x, quant), approximate=self.approximate)
        return self.fc2(h, quant)


class TimestepEmbedding(nnx.Module):
    """diffusers' ``TimestepEmbedding``: ``linear_1`` → SiLU → ``linear_2``."""

    def __init__(self, din: int, dout: int, *, site: str, rngs: nnx.Rngs):
        self.linear_1 = Linear(din, dout, site=f"{site}.linear_1", rngs=rngs)
        self.linear_2 = Linear(dout, dout, site=f"{site}.linear_2", rngs=rngs)

    def __call__(self, x, quant=None):
        return self.linear_2(jax.nn.silu(self.linear_1(x, quant)), quant)


class TextProjection(nnx.Module):
    """diffusers' ``PixArtAlphaTextProjection``: ``linear_1`` → GELU(tanh) or SiLU → ``linear_2``."""

    def __init__(self, din: int, hidden: int, *, site: str, rngs: nnx.Rngs, act: str = "gelu_tanh"):
        if act not in ("gelu_tanh", "silu"):
            raise ValueError(f"{site}: unknown activation {act!r}; expected 'gelu_tanh' or 'silu'")
        self.act = act
        self.linear_1 = Linear(din, hidden, site=f"{site}.linear_1", rngs=rngs)
        self.linear_2 = Linear(hidden, hidden, site=f"{site}.linear_2", rngs=rngs,
                               act_role="post_gelu" if act == "gelu_tanh" else "act")

    def __call__(self, x, quant=None):
        h = self.linear_1(x, quant)
        h = jax.nn.gelu(h, approximate=True) if self.act == "gelu_tanh" else jax.nn.silu(h)
        return self.linear_2(h, quant)


def split_heads(x, heads: int):
    """(B, L, H·D) → (B, L, H, D)."""
    b, l, d = x.shape
    return x.reshape(b, l, heads, d // heads)


def merge_heads(x):
    """(B, L, H, D) → (B, L, H·D)."""
    b, l, h, d = x.shape
    return x.reshape(b, l, h * d)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

# diffusers config keys that do not change the inference graph of a PixArt transformer.
_IGNORED_KEYS = frozenset({
    "dropout", "norm_num_groups", "upcast_attention", "num_vector_embeds", "use_linear_projection",
})


@dataclasses.dataclass(frozen=True)
class Config:
    """A PixArt transformer's hyper-parameters (diffusers' ``PixArtTransformer2DModel`` arguments).

    ``None`` defaults are resolved as diffusers resolves them: ``out_channels`` → ``in_channels``,
    ``interpolation_scale`` → ``max(sample_size // 64, 1)``, ``use_additional_conditions`` →
    ``sample_size == 128``. The defaults are PixArt-Σ-XL/2-1024's published configuration.
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
    interpolation_scale: float | None = 2
    use_additional_conditions: bool | None = False
    caption_channels: int | None = 4096
    attention_type: str = "default"

    def __post_init__(self):
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.interpolation_scale is None:
            object.__setattr__(self, "interpolation_scale", max(self.sample_size // 64, 1))
        if self.use_additional_conditions is None:
            object.__setattr__(self, "use_additional_conditions", self.sample_size == 128)
        if self.norm_type != "ada_norm_single":
            raise ValueError(f"PixArt Config: norm_type={self.norm_type!r} is not supported (only 'ada_norm_single')")
        if self.attention_type != "default":
            raise ValueError(f"PixArt Config: attention_type={self.attention_type!r} is not supported (only 'default')")
        if self.activation_fn not in ("gelu-approximate", "gelu"):
            raise ValueError(f"PixArt Config: activation_fn={self.activation_fn!r} is not supported "
                             "('gelu-approximate' or 'gelu')")
        if self.cross_attention_dim is None:
            raise ValueError("PixArt Config: cross_attention_dim=None (no cross-attention) is not supported")
        if self.use_additional_conditions and self.inner_dim % 3:
            raise ValueError(f"PixArt Config: use_additional_conditions needs a hidden size divisible by 3 "
                             f"(resolution and aspect-ratio embeddings of size hidden/3), got {self.inner_dim}")
        if self.caption_channels is not None and self.cross_attention_dim != self.inner_dim:
            raise ValueError(f"PixArt Config: with a caption projection the text is projected to the hidden size "
                             f"{self.inner_dim}, so cross_attention_dim must equal it, got {self.cross_attention_dim}")

    @property
    def inner_dim(self) -> int:
        """Hidden size: heads × head dimension."""
        return self.num_attention_heads * self.attention_head_dim

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-serialisable dict (``from_dict`` inverts it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """Build from a jdq config dict or a diffusers ``config.json`` dict.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, …) and keys that do
        not affect inference (dropout, …) are ignored; an unknown key, or one that selects a
        variant this port does not implement, raises ``ValueError`` naming it.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in ("only_cross_attention", "double_self_attention"):
                if value:
                    raise ValueError(f"PixArt Config: {key}=True is not supported")
                continue
            if key not in fields:
                raise ValueError(f"PixArt Config: unknown key {key!r}")
            kwargs[key] = value
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """diffusers' ``Attention`` with the default processor: to_q/to_k/to_v → softmax(q·kᵀ/√d)·v → to_out.0."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, site: str, rngs: nnx.Rngs,
                 kv_dim: int | None = None, bias: bool = True):
        inner = heads * head_dim
        kv_dim = dim if kv_dim is None else kv_dim
        self.heads = heads
        self.site = site
        self.to_q = Linear(dim, inner, site=f"{site}.to_q", rngs=rngs, bias=bias)
        self.to_k = Linear(kv_dim, inner, site=f"{site}.to_k", rngs=rngs, bias=bias)
        self.to_v = Linear(kv_dim, inner, site=f"{site}.to_v", rngs=rngs, bias=bias)
        self.to_out = Linear(inner, dim, site=f"{site}.to_out.0", rngs=rngs)

    def __call__(self, x, context=None, mask=None, quant=None):
        context = x if context is None else context
        q = split_heads(self.to_q(x, quant), self.heads)
        k = split_heads(self.to_k(context, quant), self.heads)
        v = split_heads(self.to_v(context, quant), self.heads)
        out = layers.attention(q, k, v, site=self.site, quant=quant, mask=mask)
        return self.to_out(merge_heads(out), quant)


class PixArtBlock(nnx.Module):
    """diffusers' ``BasicTransformerBlock`` with ``norm_type='ada_norm_single'`` (PixArt)."""

    def __init__(self, cfg: Config, index: int, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        site = f"transformer_blocks.{index}"
        self.norm1 = LayerNorm(d, eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine)
        self.attn1 = Attention(d, cfg.num_attention_heads, cfg.attention_head_dim, site=f"{site}.attn1",
                               rngs=rngs, bias=cfg.attention_bias)
        self.attn2 = Attention(d, cfg.num_attention_heads, cfg.attention_head_dim, site=f"{site}.attn2",
                               rngs=rngs, kv_dim=cfg.cross_attention_dim, bias=cfg.attention_bias)
        self.norm2 = LayerNorm(d, eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine)
        self.ff = FeedForward(d, site=f"{site}.ff", rngs=rngs, approximate=cfg.activation_fn == "gelu-approximate")
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (6, d)) / d**0.5)

    def __call__(self, x, text, text_mask, t6, quant=None):
        b, _, d = x.shape
        mod = self.scale_shift_table[...].astype(x.dtype)[None] + t6.reshape(b, 6, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attn1(h, quant=quant)
        # PixArt applies no norm before cross-attention.
        x = x + self.attn2(x, text, text_mask, quant=quant)
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(h, quant)


class PixArtTransformer(nnx.Module):
    """PixArt-Σ / PixArt-α transformer; see the module docstring for inputs, outputs and sites."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        p = cfg.patch_size
        self.config = cfg
        self.pos_embed_proj = Linear(p * p * cfg.in_channels, d, site="pos_embed.proj", rngs=rngs)
        self.timestep_embedder = TimestepEmbedding(256, d, site="adaln_single.emb.timestep_embedder", rngs=rngs)
        if cfg.use_additional_conditions:
            size_dim = d // 3
            self.resolution_embedder = TimestepEmbedding(
                256, size_dim, site="adaln_single.emb.resolution_embedder", rngs=rngs)
            self.aspect_ratio_embedder = TimestepEmbedding(
                256, size_dim, site="adaln_single.emb.aspect_ratio_embedder", rngs=rngs)
        else:
            self.resolution_embedder = None
            self.aspect_ratio_embedder = None
        self.adaln_linear = Linear(d, 6 * d, site="adaln_single.linear", rngs=rngs)
        if cfg.caption_channels is not None:
            self.caption_projection = TextProjection(cfg.caption_channels, d, site="caption_projection", rngs=rngs)
        else:
            self.caption_projection = None
        self.transformer_blocks = nnx.List([PixArtBlock(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (2, d)) / d**0.5)
        self.proj_out = Linear(d, p * p * cfg.out_channels, site="proj_out", rngs=rngs)

    def __call__(self, x, t, text_emb, mask=None, *, resolution=None, aspect_ratio=None, quant=None):
        """Predict noise (and variance) for NHWC latents ``x`` at timesteps ``t`` given T5 ``text_emb``.

        ``mask`` (B, L): 1/True keeps a text token (``None`` keeps all). With
        ``use_additional_conditions``, ``resolution`` (B, 2) is the image (height, width) in
        pixels and ``aspect_ratio`` (B,) or (B, 1) its height/width; when omitted they default,
        as in diffusers' PixArt-α pipeline, to 8× the latent size and its ratio.
        """
        cfg = self.config
        p = cfg.patch_size
        b, hh, ww, c = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"PixArt: x has {c} channels, the model expects in_channels={cfg.in_channels}")
        dtype = x.dtype
        gh, gw = hh // p, ww // p

        pos = sincos_pos_embed_2d(cfg.inner_dim, gh, gw, base_size=cfg.sample_size // p,
                                  interpolation_scale=cfg.interpolation_scale)
        tokens = self.pos_embed_proj(patchify(x, p), quant)
        h = (tokens.astype(jnp.float32) + pos[None]).astype(dtype)

        t = jnp.broadcast_to(jnp.asarray(t).reshape(-1), (b,))
        emb = self.timestep_embedder(timestep_features(t).astype(dtype), quant)
        if cfg.use_additional_conditions:
            if resolution is None:
                resolution = jnp.broadcast_to(jnp.asarray([hh * 8.0, ww * 8.0], jnp.float32), (b, 2))
            if aspect_ratio is None:
                aspect_ratio = jnp.full((b, 1), hh / ww, jnp.float32)
            res = timestep_features(jnp.asarray(resolution).reshape(-1)).astype(dtype)
            res = self.resolution_embedder(res, quant).reshape(b, -1)
            ar = timestep_features(jnp.asarray(aspect_ratio).reshape(-1)).astype(dtype)
            ar = self.aspect_ratio_embedder(ar, quant).reshape(b, -1)
            emb = emb + jnp.concatenate([res, ar], axis=1)
        t6 = self.adaln_linear(jax.nn.silu(emb), quant)

        text = text_emb.astype(dtype)
        if self.caption_projection is not None:
            text = self.caption_projection(text, quant)
        text_mask = None
        if mask is not None:
            text_mask = (jnp.asarray(mask) > 0.5)[:, None, None, :]  # (B, 1, 1, L)

        for block in self.transformer_blocks:
            h = block(h, text, text_mask, t6, quant)

        shift, scale = jnp.split(self.scale_shift_table[...].astype(dtype)[None] + emb[:, None], 2, axis=1)
        h = layer_norm(h, 1e-6) * (1 + scale) + shift
        out = self.proj_out(h, quant)
        return unpatchify(out, gh, gw, p, cfg.out_channels)


def build(config: Config | Mapping[str, Any], rngs: nnx.Rngs) -> PixArtTransformer:
    """The PixArt transformer for ``config`` (a :class:`Config` or a dict), randomly initialised."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return PixArtTransformer(cfg, rngs=rngs)
