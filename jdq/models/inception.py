"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph) in Flax NNX: ``pool``, ``logits`` and ``spatial`` features.

This is the network behind every published FID, sFID, IS and precision number: the graph the
ADM evaluator (openai/guided-diffusion ``evaluations/``) runs, and torch-fidelity's
``inception-v3-compat`` port of it, which this module equals (tests, random weights, float32).
It is not a denoiser; ``jdq.models.load`` returns it like any other family.

``model(images)``: uint8 images ``[B, H, W, C]`` (NHWC, any size, ``C`` = 3, or 1 for grey,
repeated to RGB) -> ``{"pool": [B, 2048], "logits": [B, 1008], "spatial": [B, 2023]}``:

1. TensorFlow 1's bilinear resize to ``input_size`` (299) with ``align_corners=False`` and no
   half-pixel centres: output pixel ``i`` samples source position ``i · (in/out)`` (float32),
   interpolating the two neighbours ``⌊·⌋`` and ``min(⌊·⌋ + 1, in − 1)``;
2. ``(x − 128) / 128``;
3. the Inception-v3 trunk: conv + batch norm (eps 1e-3) + ReLU blocks, the TF graph's pools
   (3×3 average pools that do not count the padding; max pooling, not average, in the last
   block's pool branch);
4. ``pool``: the global average of the last block (TF ``pool_3``); ``logits``: ``pool`` times
   the final layer's weights *without* its bias (torch-fidelity's ``logits_unbiased``; the ADM
   evaluator's softmax input), the 1008 classes of the graph; ``spatial``: the first 7 channels of
   the 17×17 output of ``Mixed_6d``'s 1×1 branch (TF ``mixed_6/conv``, the ReLU output), flattened
   in (row, column, channel) order as the ADM evaluator does — its sFID features.

The final layer's bias stays in the params (``fc.bias``): ``logits + fc.bias`` are the
classifier's own logits. ``model.call("trunk", x)`` runs steps 3–4 on an already preprocessed
``[B, input_size, input_size, 3]`` batch (``model.call("preprocess", images)``), so callers that
feed many image sizes compile the network once.

Weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` or pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``, converted by ``jdq convert FILE OUT``
(``checkpoints_convert.inception``); module and parameter paths are those files' names
(``Mixed_6d.branch1x1.conv.kernel``, ``….bn.scale``/``bias``/``mean``/``var``, ``fc.kernel``/``bias``).
``input_size`` other than 299 gives features no published number uses; tests use it to be fast.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdq.models.base import ConfigBase, Model

FAMILY = "inception"
BN_EPS = 1e-3
SPATIAL_CHANNELS = 7


@dataclasses.dataclass(frozen=True)
class Config(ConfigBase):
    """FID Inception-v3: 1008 classes (the TF graph's), input resized to ``input_size`` (299)."""

    num_classes: int = 1008
    input_size: int = 299
    dtype: str = "float32"
    source: str = "random"

    def __post_init__(self):
        if self.input_size < 75:
            raise ValueError(f"Inception config: input_size {self.input_size} < 75 leaves no spatial extent")
        jnp.dtype(self.dtype)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class Conv(nnx.Module):
    """A bias-free convolution, HWIO ``kernel``."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        kh, kw = _pair(kernel_size)
        self.kernel = nnx.Param(jnp.zeros((kh, kw, c_in, c_out), jnp.float32))
        self.stride = _pair(stride)
        self.padding = tuple((p, p) for p in _pair(padding))

    def __call__(self, x):
        return jax.lax.conv_general_dilated(x, self.kernel[...].astype(x.dtype), self.stride, self.padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BatchNorm(nnx.Module):
    """Inference batch norm: ``(x − mean) / sqrt(var + 1e-3) · scale + bias``."""

    def __init__(self, c):
        self.scale = nnx.Param(jnp.ones((c,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((c,), jnp.float32))
        self.mean = nnx.Param(jnp.zeros((c,), jnp.float32))
        self.var = nnx.Param(jnp.ones((c,), jnp.float32))

    def __call__(self, x):
        inv = jax.lax.rsqrt(self.var[...].astype(x.dtype) + BN_EPS)
        return (x - self.mean[...].astype(x.dtype)) * inv * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class BasicConv2d(nnx.Module):
    """conv -> batch norm -> ReLU."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        self.conv = Conv(c_in, c_out, kernel_size, stride, padding)
        self.bn = BatchNorm(c_out)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x, size=3, stride=2, padding=0):
    """Max pooling (padding with -inf, as PyTorch and TF)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), pad)


def avg_pool_3x3_same(x):
    """3×3 stride-1 average pooling over the window's in-image pixels only (TF; ``count_include_pad=False``)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return total / count


class InceptionA(nnx.Module):
    def __init__(self, c_in, pool_features):
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, c_in):
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, c_in, c7):
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def __call__(self, x, return_1x1: bool = False):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(avg_pool_3x3_same(x))
        out = jnp.concatenate([b1, b7, bd, bp], axis=-1)
        return (out, b1) if return_1x1 else out


class InceptionD(nnx.Module):
    def __init__(self, c_in):
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
    """The last two blocks; ``max_pool_branch``: the TF graph's second one pools by max, not average."""

    def __init__(self, c_in, max_pool_branch: bool):
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)
        self.max_pool_branch = max_pool_branch

    def __call__(self, x):
        b1 = self.branch1x1(x)
        t = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(t), self.branch3x3_2b(t)], axis=-1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], axis=-1)
        pooled = max_pool(x, 3, 1, 1) if self.max_pool_branch else avg_pool_3x3_same(x)
        return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class Linear(nnx.Module):
    """The final layer: ``kernel`` (2048, classes) and ``bias``."""

    def __init__(self, d_in, d_out):
        self.kernel = nnx.Param(jnp.zeros((d_in, d_out), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32))


def _resize_table(n_in: int, n_out: int):
    """TF1 bilinear (align_corners=False) source indices and weights along one axis, in float32 as TF."""
    pos = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
    lo = pos.astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo.astype(np.float32)).astype(np.float32)


def resize_bilinear_tf1(x, size: int):
    """TensorFlow 1 ``resize_bilinear`` (``align_corners=False``, no half-pixel centres) of NHWC ``x`` to ``size²``."""
    h, w = x.shape[1:3]
    ylo, yhi, dy = _resize_table(h, size)
    xlo, xhi, dx = _resize_table(w, size)
    top, bottom = x[:, ylo], x[:, yhi]
    dx = jnp.asarray(dx).reshape(1, 1, -1, 1)
    row0 = top[:, :, xlo] + (top[:, :, xhi] - top[:, :, xlo]) * dx
    row1 = bottom[:, :, xlo] + (bottom[:, :, xhi] - bottom[:, :, xlo]) * dx
    return row0 + (row1 - row0) * jnp.asarray(dy).reshape(1, -1, 1, 1)


class Inception(nnx.Module):
    """The FID Inception-v3; ``__call__(images, quant=None)`` -> ``{"pool", "logits", "spatial"}``."""

    def __init__(self, config: Config, rngs: nnx.Rngs | None = None):
        self.config = config
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        self.fc = Linear(2048, config.num_classes)

    def preprocess(self, images, quant=None):
        """uint8 ``[B, H, W, 1|3]`` -> the network's input ``[B, S, S, 3]`` in about ``[-1, 1]``."""
        if images.dtype != jnp.uint8:
            raise TypeError(f"the FID Inception takes uint8 images [B, H, W, C] in 0..255, got {images.dtype} "
                            f"(convert with jdq.sampling.images.to_uint8)")
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"the FID Inception takes images [B, H, W, 1 or 3] (NHWC), got shape {images.shape}")
        x = images.astype(jnp.dtype(self.config.dtype))
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        x = resize_bilinear_tf1(x, self.config.input_size)
        return (x - 128.0) / 128.0

    def trunk(self, x, quant=None):
        """``{"pool", "logits", "spatial"}`` of a preprocessed batch ``[B, S, S, 3]``."""
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = max_pool(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        x, b1 = self.Mixed_6d(x, return_1x1=True)
        spatial = b1[..., :SPATIAL_CHANNELS].reshape(b1.shape[0], -1)
        x = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean(axis=(1, 2))
        logits = pool @ self.fc.kernel[...].astype(pool.dtype)
        return {"pool": pool.astype(jnp.float32), "logits": logits.astype(jnp.float32),
                "spatial": spatial.astype(jnp.float32)}

    def __call__(self, images, quant=None):
        return self.trunk(self.preprocess(images))


def build(config: Config, rngs: nnx.Rngs | None = None) -> Inception:
    """The Inception module for ``config`` (params from :func:`from_config` or a converted file)."""
    return Inception(config, rngs)


def _he_init(params):
    """Random params for a ReLU network: conv kernels ×√2 (He), batch norms the identity, so features stay O(1)."""
    def fix(path, x):
        name = getattr(path[-1], "key", None)
        parent = getattr(path[-2], "key", None) if len(path) > 1 else None
        if parent == "conv":
            return x * np.sqrt(2.0)
        if parent == "bn":
            return jnp.ones_like(x) if name in ("scale", "var") else jnp.zeros_like(x)
        return x
    return jax.tree_util.tree_map_with_path(fix, params)


def from_config(config: Config, key=None, abstract: bool = False) -> Model:
    """A :class:`~jdq.models.base.Model` of ``config``: random (He-initialised) params from ``key``, or abstract ones."""
    if abstract:
        return Model.abstract(config, build)
    model = Model.create(config, build, key)
    return model.replace(params=_he_init(model.params))
