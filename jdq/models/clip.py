"""CLIP text and vision towers as transformers' ``CLIPTextModel(WithProjection)``,
``CLIPVisionModelWithProjection`` and ``CLIPModel``: one family, either tower or both.

* ``model(input_ids, attention_mask=None)`` (the text tower): token ids (B, L), optional mask
  (B, L) (1 keeps a token) -> ``{"last": (B, L, D), "penultimate": (B, L, D), "pooled": (B, P)}``:
  the final-norm'd last hidden state, the hidden state before the last layer (no final norm;
  what SD3 conditions on, transformers' ``hidden_states[-2]``) and the EOS token's final state,
  projected by ``text_projection`` where the model has one (transformers' ``text_embeds``). The
  EOS position is the first ``eos_token_id`` in each row, or, for configs with the legacy
  ``eos_token_id == 2``, the position of the largest id (as transformers does).
* ``model.call("encode_image", pixels)``: NHWC pixels (B, S, S, 3), normalised as CLIP's image
  processor does -> the class token's post-norm'd state, projected by ``visual_projection``
  where present (transformers' ``image_embeds``).

Text attention is causal (CLIP's text transformer) and padded keys are masked; the MLP
activation is ``hidden_act`` (``quick_gelu`` for OpenAI's CLIP-L, ``gelu`` for OpenCLIP's
bigG/G). Sites are transformers' module paths: ``text_model.encoder.layers.{i}.self_attn.q_proj``
/ ``k_proj`` / ``v_proj`` / ``out_proj`` (the attention matmuls ``...self_attn.qk`` / ``.pv``),
``...mlp.fc1`` / ``...mlp.fc2`` (role ``post_gelu``), ``text_projection``; the same under
``vision_model.`` plus the patch embedding ``vision_model.embeddings.patch_embedding`` and
``visual_projection``.
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
from jdq.models.layers import Embedding, LayerNorm, Linear, PatchEmbed

FAMILY = "clip"
_ACTS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class TextConfig(ConfigBase):
    """The text tower (transformers' ``CLIPTextConfig`` names); defaults are CLIP ViT-L/14's."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2

    def __post_init__(self):
        if self.hidden_act not in _ACTS:
            raise ValueError(f"CLIP text config: hidden_act={self.hidden_act!r} is not supported; known: {list(_ACTS)}")


@dataclasses.dataclass(frozen=True)
class VisionConfig(ConfigBase):
    """The vision tower (transformers' ``CLIPVisionConfig`` names); defaults are CLIP ViT-L/14's."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in _ACTS:
            raise ValueError(f"CLIP vision config: hidden_act={self.hidden_act!r} is not supported; known: {list(_ACTS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIP vision config: image_size {self.image_size} is not a multiple of the patch "
                             f"{self.patch_size}")


@dataclasses.dataclass(frozen=True)
class Config(ConfigBase):
    """A CLIP model: a text tower, a vision tower or both, and their projections.

    ``text_projection`` / ``visual_projection``: whether the tower has its (bias-free) projection
    to ``projection_dim``; ``logit_scale``: whether the learned temperature is kept (a full
    ``CLIPModel``). ``dtype`` is the compute dtype.
    """

    text: TextConfig | None = None
    vision: VisionConfig | None = None
    projection_dim: int | None = None
    text_projection: bool = False
    visual_projection: bool = False
    logit_scale: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.text is None and self.vision is None:
            raise ValueError("CLIP config: neither a text nor a vision tower")
        if (self.text_projection and self.text is None) or (self.visual_projection and self.vision is None):
            raise ValueError("CLIP config: a projection without its tower")
        if (self.text_projection or self.visual_projection) and not self.projection_dim:
            raise ValueError("CLIP config: a projection needs projection_dim")
        jnp.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict (towers as nested dicts)."""
        d = super().to_dict()
        d["text"] = None if self.text is None else self.text.to_dict()
        d["vision"] = None if self.vision is None else self.vision.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """From :meth:`to_dict`'s output (towers as nested dicts); unknown keys are an error naming them."""
        d = {k: v for k, v in d.items() if k not in ("family", "jdq_format")}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"CLIP config: unknown key(s) {unknown}")
        text, vision = d.pop("text", None), d.pop("vision", None)
        return cls(text=None if text is None else TextConfig.from_dict(text),
                   vision=None if vision is None else VisionConfig.from_dict(vision), **d)


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    return lambda x: jax.nn.gelu(x, approximate=True)


class CLIPAttention(nnx.Module):
    """transformers' ``CLIPAttention``: q/k/v/out projections with biases, logits scaled by 1/√d."""

    def __init__(self, dim: int, heads: int, site: str, *, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"CLIP {site}: hidden size {dim} is not divisible by {heads} heads")
        self.site, self.heads = site, heads
        self.q_proj = Linear(dim, dim, site=f"{site}.q_proj", rngs=rngs)
        self.k_proj = Linear(dim, dim, site=f"{site}.k_proj", rngs=rngs)
        self.v_proj = Linear(dim, dim, site=f"{site}.v_proj", rngs=rngs)
        self.out_proj = Linear(dim, dim, site=f"{site}.out_proj", rngs=rngs)

    def __call__(self, x, mask, quant=None):
        q, k, v = (layers.split_heads(p(x, quant), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = layers.attention(q, k, v, site=self.site, quant=quant, mask=mask)
        return self.out_proj(layers.merge_heads(out), quant)


class CLIPMlp(nnx.Module):
    """``fc2(act(fc1(x)))``; ``fc2``'s input has role ``post_gelu``."""

    def __init__(self, dim: int, hidden: int, act: str, site: str, *, rngs: nnx.Rngs):
        self.act = act
        self.fc1 = Linear(dim, hidden, site=f"{site}.fc1", rngs=rngs)
        self.fc2 = Linear(hidden, dim, site=f"{site}.fc2", rngs=rngs, act_role="post_gelu")

    def __call__(self, x, quant=None):
        if self.act == "gelu":
            h = self.fc1(x, quant, activation="gelu")
        elif self.act in ("gelu_new", "gelu_pytorch_tanh"):
            h = self.fc1(x, quant, activation="gelu_tanh")
        else:
            h = _activation(self.act)(self.fc1(x, quant))
        return self.fc2(h, quant)


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm block: ``x + self_attn(layer_norm1(x))``, then ``x + mlp(layer_norm2(x))``."""

    def __init__(self, cfg: TextConfig | VisionConfig, site: str, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.layer_norm1 = LayerNorm(d, eps=cfg.layer_norm_eps, affine=True)
        self.self_attn = CLIPAttention(d, cfg.num_attention_heads, f"{site}.self_attn", rngs=rngs)
        self.layer_norm2 = LayerNorm(d, eps=cfg.layer_norm_eps, affine=True)
        self.mlp = CLIPMlp(d, cfg.intermediate_size, cfg.hidden_act, f"{site}.mlp", rngs=rngs)

    def __call__(self, x, mask, quant=None):
        x = x + self.self_attn(self.layer_norm1(x), mask, quant)
        return x + self.mlp(self.layer_norm2(x), quant)


class CLIPEncoder(nnx.Module):
    """The stack of encoder layers; returns the last hidden state and the one before the last layer."""

    def __init__(self, cfg: TextConfig | VisionConfig, site: str, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, f"{site}.layers.{i}", rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])

    def __call__(self, x, mask, quant=None):
        before_last = x
        for layer in self.layers:
            before_last = x
            x = layer(x, mask, quant)
        return x, before_last


class TextEmbeddings(nnx.Module):
    """Token and learned absolute position embeddings."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)

    def __call__(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[...][None, : ids.shape[1]]


class TextTransformer(nnx.Module):
    """transformers' ``CLIPTextTransformer``: embeddings, causal encoder, final LayerNorm."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, "text_model.encoder", rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, affine=True)

    def __call__(self, ids, attention_mask, dtype, quant=None):
        cfg = self.config
        b, n = ids.shape
        if n > cfg.max_position_embeddings:
            raise ValueError(f"CLIP text: {n} tokens exceed max_position_embeddings {cfg.max_position_embeddings}")
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        last, penultimate = self.encoder(self.embeddings(ids).astype(dtype), mask, quant)
        last = self.final_layer_norm(last)
        if cfg.eos_token_id == 2:  # legacy configs: the EOS token is the largest id
            eos = jnp.argmax(ids, axis=-1)
        else:
            eos = jnp.argmax(ids == cfg.eos_token_id, axis=-1)
        pooled = last[jnp.arange(b), eos]
        return last, penultimate, pooled


class VisionEmbeddings(nnx.Module):
    """Class token, patch embedding (a linear over patches: a site) and learned positions."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,)))
        self.patch_embedding = PatchEmbed(cfg.num_channels, cfg.patch_size, d, rngs=rngs, use_bias=False,
                                          site="vision_model.embeddings.patch_embedding")
        self.position_embedding = Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, d, rngs=rngs)

    def __call__(self, pixels, quant=None):
        patches = self.patch_embedding(pixels, quant)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (patches.shape[0], 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.weight[...].astype(patches.dtype)[None]


class VisionTransformer(nnx.Module):
    """transformers' ``CLIPVisionTransformer``: embeddings, pre-LayerNorm, encoder, post-LayerNorm of the class token."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, affine=True)  # transformers' spelling
        self.encoder = CLIPEncoder(cfg, "vision_model.encoder", rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, affine=True)

    def __call__(self, pixels, quant=None):
        h = self.pre_layrnorm(self.embeddings(pixels, quant))
        last, _ = self.encoder(h, None, quant)
        return self.post_layernorm(last[:, 0])


class CLIP(nnx.Module):
    """A CLIP text and/or vision tower with projections; see the module docstring."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.text_model = None if cfg.text is None else TextTransformer(cfg.text, rngs=rngs)
        self.vision_model = None if cfg.vision is None else VisionTransformer(cfg.vision, rngs=rngs)
        self.text_projection = (Linear(cfg.text.hidden_size, cfg.projection_dim, site="text_projection", rngs=rngs,
                                       use_bias=False) if cfg.text_projection else None)
        self.visual_projection = (Linear(cfg.vision.hidden_size, cfg.projection_dim, site="visual_projection",
                                         rngs=rngs, use_bias=False) if cfg.visual_projection else None)
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32)) if cfg.logit_scale else None

    def __call__(self, input_ids, attention_mask=None, *, quant=None):
        """``{"last", "penultimate", "pooled"}`` of the text tower for token ids (B, L)."""
        if self.text_model is None:
            raise ValueError("this CLIP model has no text tower (a vision model); use encode_image")
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"CLIP text: input_ids must be (B, L), got shape {tuple(ids.shape)}")
        last, penultimate, pooled = self.text_model(ids, attention_mask, jnp.dtype(self.config.dtype), quant)
        if self.text_projection is not None:
            pooled = self.text_projection(pooled, quant)
        return {"last": last, "penultimate": penultimate, "pooled": pooled}

    def encode_text(self, input_ids, attention_mask=None, *, quant=None):
        """The pooled (projected) text embedding (B, P)."""
        return self(input_ids, attention_mask, quant=quant)["pooled"]

    def encode_image(self, pixels, *, quant=None):
        """The pooled (projected) image embedding (B, P) of NHWC pixels (B, S, S, C)."""
        if self.vision_model is None:
            raise ValueError("this CLIP model has no vision tower (a text model)")
        vc = self.config.vision
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (vc.image_size, vc.image_size, vc.num_channels):
            raise ValueError(f"CLIP vision: pixels must be (B, {vc.image_size}, {vc.image_size}, {vc.num_channels}) "
                             f"channels-last, got {tuple(pixels.shape)}")
        pooled = self.vision_model(jnp.asarray(pixels).astype(jnp.dtype(self.config.dtype)), quant)
        if self.visual_projection is not None:
            pooled = self.visual_projection(pooled, quant)
        return pooled


def build(config: Config | Mapping[str, Any], rngs: nnx.Rngs) -> CLIP:
    """The CLIP module for ``config`` with random params from ``rngs``."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return CLIP(cfg, rngs=rngs)


def from_config(config: Config, key=None, abstract: bool = False) -> Model:
    """A :class:`~jdq.models.base.Model` of ``config``: random params from ``key``, or abstract ones."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return Model.abstract(cfg, build) if abstract else Model.create(cfg, build, key)
