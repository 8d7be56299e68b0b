"""The T5 encoder (T5 v1.1 / T5-XXL as PixArt-Σ and SD3 use it) as transformers' ``T5EncoderModel``.

``model(input_ids, attention_mask=None)``: token ids (B, L) and an optional mask (B, L) (1 keeps
a token) -> the last hidden state (B, L, d_model) in ``Config.dtype``. The structure is
transformers': token embedding, ``num_layers`` pre-norm blocks of self-attention and a
feed-forward (gated GELU ``wo(gelu_tanh(wi_0 x) · wi_1 x)`` for T5 v1.1, ``wo(relu(wi x))`` for
the original T5), RMS norms without a mean (T5's LayerNorm), and a relative position bias
computed from bucketed distances by the first block's ``relative_attention_bias`` table and
shared by all blocks. The logits are not scaled by 1/√d (T5 folds the scale into its weights).

Quantization sites (transformers' module paths, as PixArt-Σ and SD3 keep diffusers'):

=====================================================  ==========================  ==========
site                                                   what                        input role
=====================================================  ==========================  ==========
``encoder.block.{i}.layer.0.SelfAttention.q/k/v/o``    attention projections       ``act``
``encoder.block.{i}.layer.0.SelfAttention.qk`` / ``.pv``  attention matmuls
``encoder.block.{i}.layer.1.DenseReluDense.wi_0/wi_1``  gated feed-forward input    ``act``
``encoder.block.{i}.layer.1.DenseReluDense.wo``         feed-forward output         ``act``
=====================================================  ==========================  ==========

(``wi`` instead of ``wi_0``/``wi_1`` for ``feed_forward_proj='relu'``.) The embedding table is
``shared.weight`` (tied with ``encoder.embed_tokens`` in transformers), norm weights ``scale``.
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
from jdq.models.base import ConfigBase, Model
from jdq.models.layers import Embedding, Linear, RMSNorm

FAMILY = "t5"

_FEED_FORWARD = ("gated-gelu", "relu", "gated-relu", "gelu")


@dataclasses.dataclass(frozen=True)
class Config(ConfigBase):
    """A T5 encoder's hyper-parameters (transformers' ``T5Config`` names); defaults are T5-XXL v1.1's.

    ``feed_forward_proj``: ``"gated-gelu"`` (T5 v1.1, GELU-tanh), ``"relu"`` (original T5),
    ``"gated-relu"`` or ``"gelu"``. ``dtype`` is the compute dtype.
    """

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dtype: str = "float32"

    def __post_init__(self):
        if self.feed_forward_proj not in _FEED_FORWARD:
            raise ValueError(f"T5 config: feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                             f"known: {list(_FEED_FORWARD)}")
        jnp.dtype(self.dtype)

    @property
    def gated(self) -> bool:
        """Whether the feed-forward is gated (``wi_0``/``wi_1``)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The feed-forward activation (a :data:`jdq.models.layers.ACTIVATIONS` name, or ``"relu"``)."""
        return "gelu_tanh" if self.feed_forward_proj.endswith("gelu") else "relu"

    @property
    def inner_dim(self) -> int:
        """Attention width: heads × d_kv."""
        return self.num_heads * self.d_kv

    @classmethod
    def from_transformers(cls, d: Mapping[str, Any], dtype: str = "float32") -> "Config":
        """From a transformers ``T5Config`` (``config.json`` dict): the keys this encoder reads, the
        rest (dropout, decoder sizes, token ids, ...) do not change its inference graph."""
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        kept = {k: d[k] for k in names if k in d}
        if "feed_forward_proj" not in d and d.get("is_gated_act"):
            kept["feed_forward_proj"] = "gated-gelu"
        return cls(**kept, dtype=dtype)


#: T5 v1.1 XXL's encoder (``google/t5-v1_1-xxl``; the ``text_encoder_3`` of SD3, PixArt-Σ's T5):
#: 4,762,310,656 parameters (transformers' ``T5EncoderModel(T5Config(**this))`` on the meta device).
T5_V1_1_XXL = Config()


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int = 32,
                              max_distance: int = 128) -> np.ndarray:
    """T5's bidirectional relative position buckets (q, k) int32 (Mesh TensorFlow's bucketing).

    Half of the buckets are for keys after the query; within a half, distances below
    ``num_buckets/4`` have their own bucket and larger ones share logarithmically wider buckets
    up to ``max_distance``. The log is taken in float32, as transformers does, so boundary
    distances fall in the same bucket.
    """
    rel = np.arange(key_length, dtype=np.int64)[None, :] - np.arange(query_length, dtype=np.int64)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        logs = np.log(dist.astype(np.float32) / np.float32(max_exact))
    scaled = logs / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(dist < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


class T5SelfAttention(nnx.Module):
    """transformers' ``T5Attention`` (encoder): q/k/v/o without biases, unscaled logits + position bias."""

    def __init__(self, cfg: Config, site: str, has_bias_table: bool, *, rngs: nnx.Rngs):
        self.site = site
        self.heads = cfg.num_heads
        d, inner = cfg.d_model, cfg.inner_dim
        self.q = Linear(d, inner, site=f"{site}.q", rngs=rngs, use_bias=False)
        self.k = Linear(d, inner, site=f"{site}.k", rngs=rngs, use_bias=False)
        self.v = Linear(d, inner, site=f"{site}.v", rngs=rngs, use_bias=False)
        self.o = Linear(inner, d, site=f"{site}.o", rngs=rngs, use_bias=False)
        self.relative_attention_bias = (Embedding(cfg.relative_attention_num_buckets, cfg.num_heads, rngs=rngs)
                                        if has_bias_table else None)

    def __call__(self, x, bias, mask, quant=None):
        q = layers.split_heads(self.q(x, quant), self.heads)
        k = layers.split_heads(self.k(x, quant), self.heads)
        v = layers.split_heads(self.v(x, quant), self.heads)
        out = layers.attention(q, k, v, site=self.site, quant=quant, mask=mask, scale=1.0, bias=bias)
        return self.o(layers.merge_heads(out), quant)


class T5FeedForward(nnx.Module):
    """transformers' ``T5DenseGatedActDense`` (``wi_0``, ``wi_1``, ``wo``) or ``T5DenseActDense`` (``wi``, ``wo``)."""

    def __init__(self, cfg: Config, site: str, *, rngs: nnx.Rngs):
        self.activation = cfg.activation
        d, f = cfg.d_model, cfg.d_ff
        if cfg.gated:
            self.wi_0 = Linear(d, f, site=f"{site}.wi_0", rngs=rngs, use_bias=False)
            self.wi_1 = Linear(d, f, site=f"{site}.wi_1", rngs=rngs, use_bias=False)
            self.wi = None
        else:
            self.wi = Linear(d, f, site=f"{site}.wi", rngs=rngs, use_bias=False)
            self.wi_0 = self.wi_1 = None
        self.wo = Linear(f, d, site=f"{site}.wo", rngs=rngs, use_bias=False)

    def __call__(self, x, quant=None):
        act = None if self.activation == "relu" else self.activation
        first = self.wi if self.wi is not None else self.wi_0
        h = first(x, quant, activation=act)
        if act is None:
            h = jax.nn.relu(h)
        if self.wi_1 is not None:
            h = h * self.wi_1(x, quant)
        return self.wo(h, quant)


class T5LayerSelfAttention(nnx.Module):
    """``layer.0`` of a block: ``x + SelfAttention(layer_norm(x))``."""

    def __init__(self, cfg: Config, site: str, has_bias_table: bool, *, rngs: nnx.Rngs):
        self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.SelfAttention = T5SelfAttention(cfg, f"{site}.SelfAttention", has_bias_table, rngs=rngs)

    def __call__(self, x, bias, mask, quant=None):
        return x + self.SelfAttention(self.layer_norm(x), bias, mask, quant)


class T5LayerFF(nnx.Module):
    """``layer.1`` of a block: ``x + DenseReluDense(layer_norm(x))``."""

    def __init__(self, cfg: Config, site: str, *, rngs: nnx.Rngs):
        self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.DenseReluDense = T5FeedForward(cfg, f"{site}.DenseReluDense", rngs=rngs)

    def __call__(self, x, quant=None):
        return x + self.DenseReluDense(self.layer_norm(x), quant)


class T5Block(nnx.Module):
    """transformers' ``T5Block`` of an encoder: self-attention then feed-forward."""

    def __init__(self, cfg: Config, index: int, *, rngs: nnx.Rngs):
        site = f"encoder.block.{index}.layer"
        self.layer = nnx.List([T5LayerSelfAttention(cfg, f"{site}.0", index == 0, rngs=rngs),
                               T5LayerFF(cfg, f"{site}.1", rngs=rngs)])

    def __call__(self, x, bias, mask, quant=None):
        return self.layer[1](self.layer[0](x, bias, mask, quant), quant)


class T5Stack(nnx.Module):
    """The encoder stack: blocks and the final RMS norm."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.block = nnx.List([T5Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)


class T5Encoder(nnx.Module):
    """The T5 encoder; see the module docstring for inputs, outputs and sites."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.shared = Embedding(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.encoder = T5Stack(cfg, rngs=rngs)

    def position_bias(self, length: int, dtype):
        """The (1, H, L, L) relative position bias of the first block's table."""
        cfg = self.config
        buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None].astype(dtype)

    def __call__(self, input_ids, attention_mask=None, *, quant=None):
        """Last hidden state (B, L, d_model) for token ids (B, L); ``attention_mask`` 1 keeps a token."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"T5: input_ids must be (B, L), got shape {tuple(ids.shape)}")
        h = self.shared(ids).astype(dtype)
        bias = self.position_bias(ids.shape[1], dtype)
        mask = None
        if attention_mask is not None:
            mask = (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        for block in self.encoder.block:
            h = block(h, bias, mask, quant)
        return self.encoder.final_layer_norm(h)


def build(config: Config | Mapping[str, Any], rngs: nnx.Rngs) -> T5Encoder:
    """The T5 encoder module for ``config`` with random params from ``rngs``."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return T5Encoder(cfg, rngs=rngs)


def from_config(config: Config, key=None, abstract: bool = False) -> Model:
    """A :class:`~jdq.models.base.Model` of ``config``: random params from ``key``, or abstract ones."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return Model.abstract(cfg, build) if abstract else Model.create(cfg, build, key)
