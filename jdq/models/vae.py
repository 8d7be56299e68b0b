"""The Stable Diffusion VAE (diffusers' ``AutoencoderKL``): encoder and decoder, channels-last.

Images are (B, H, W, 3) in [-1, 1]; latents (B, H/f, W/f, latent_channels) with
``f = 2**(len(block_out_channels) - 1)``. Module paths mirror diffusers' (``encoder.down_blocks.0
.resnets.1.conv2``), so conversion is a rename plus layout changes.

* ``model.encode(x) -> (mean, logvar)`` (``logvar`` clipped to [-30, 20] as diffusers does);
* ``model.decode(z) -> x``;
* ``model(x)``: reconstruction ``decode(mean)``;
* ``model.encode_latents(x, key=None)`` / ``model.decode_latents(z)``: the diffusion-space latents
  ``(z - shift_factor) · scaling_factor`` and back (DiT: scaling 0.18215, no shift; SD3: 16
  channels, scaling 1.5305, shift 0.0609). With ``key`` the latent is sampled, else the mean.

Convolutions are not quantization sites (they are not what DiT quantization papers quantize);
the mid-block attentions are: ``{encoder,decoder}.mid_block.attentions.0.to_q`` / ``to_k`` /
``to_v`` / ``to_out.0`` and the matmuls ``{encoder,decoder}.mid_block.attentions.0.qk`` / ``.pv``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jdq.models.base import ConfigBase, Model
from jdq.models.layers import Linear, attention, group_norm

FAMILY = "vae"


@dataclasses.dataclass(frozen=True)
class Config(ConfigBase):
    """AutoencoderKL hyper-parameters (diffusers' names and defaults for the SD VAE)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 256
    dtype: str = "float32"

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("VAE config: block_out_channels is empty")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"VAE config: {c} channels are not divisible by norm_num_groups={self.norm_num_groups}")
        jnp.dtype(self.dtype)

    @property
    def downsample_factor(self) -> int:
        """Spatial factor between images and latents."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        """``"sd"`` (SD 1.x / DiT's sd-vae-ft-ema/mse), ``"sdxl"`` (PixArt-Σ), ``"sd3"`` (16 channels)."""
        presets = {
            "sd": dict(scaling_factor=0.18215, sample_size=256),
            "sdxl": dict(scaling_factor=0.13025, sample_size=1024),
            "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False, sample_size=1024),
        }
        if name not in presets:
            raise ValueError(f"unknown VAE preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


class Conv2d(nnx.Module):
    """A 2-D convolution, channels-last: ``kernel`` (k, k, in, out) HWIO, ``bias`` (out,)."""

    def __init__(self, c_in: int, c_out: int, k: int, *, rngs: nnx.Rngs, stride: int = 1, padding: int = 0):
        fan_in = c_in * k * k
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (k, k, c_in, c_out), jnp.float32) / fan_in**0.5)
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (c_out,), jnp.float32) * 0.02)
        self.stride = stride
        self.padding = padding

    def __call__(self, x):
        p = self.padding
        y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(x.dtype), (self.stride, self.stride),
                                         ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(y.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm with affine ``scale``/``bias`` over channels-last input."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.groups = groups
        self.eps = eps

    def __call__(self, x):
        return group_norm(x, self.groups, self.scale[...], self.bias[...], eps=self.eps)


class ResnetBlock(nnx.Module):
    """GN-SiLU-conv ×2 with a residual (1×1 conv shortcut when channels change)."""

    def __init__(self, c_in: int, c_out: int, groups: int, *, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(c_in, groups)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1, rngs=rngs)
        self.norm2 = GroupNorm(c_out, groups)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1, rngs=rngs)
        self.conv_shortcut = Conv2d(c_in, c_out, 1, rngs=rngs) if c_in != c_out else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialAttention(nnx.Module):
    """Single-head self-attention over all pixels, with GroupNorm in front and a residual."""

    def __init__(self, channels: int, groups: int, *, site: str, rngs: nnx.Rngs):
        self.site = site
        self.group_norm = GroupNorm(channels, groups)
        self.to_q = Linear(channels, channels, site=f"{site}.to_q", rngs=rngs)
        self.to_k = Linear(channels, channels, site=f"{site}.to_k", rngs=rngs)
        self.to_v = Linear(channels, channels, site=f"{site}.to_v", rngs=rngs)
        self.to_out = nnx.List([Linear(channels, channels, site=f"{site}.to_out.0", rngs=rngs)])

    def __call__(self, x, quant=None):
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = (lin(t, quant)[:, :, None, :] for lin in (self.to_q, self.to_k, self.to_v))
        out = attention(q, k, v, site=self.site, quant=quant).reshape(b, h * w, c)
        return x + self.to_out[0](out, quant).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """resnet, (attention, resnet)."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, site: str, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List(
            [SpatialAttention(channels, groups, site=f"{site}.attentions.0", rngs=rngs)] if add_attention else [])

    def __call__(self, x, quant=None):
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x, quant)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    """Pad right/bottom by one, then a stride-2 3×3 conv (diffusers' ``Downsample2D(padding=0)``)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, padding=1, rngs=rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownBlock(nnx.Module):
    """``layers`` resnets, then an optional downsample."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(c_in if i == 0 else c_out, c_out, groups, rngs=rngs) for i in range(layers)])
        self.downsamplers = nnx.List([Downsample(c_out, rngs=rngs)] if downsample else [])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class UpBlock(nnx.Module):
    """``layers`` resnets, then an optional upsample."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(c_in if i == 0 else c_out, c_out, groups, rngs=rngs) for i in range(layers)])
        self.upsamplers = nnx.List([Upsample(c_out, rngs=rngs)] if upsample else [])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Encoder(nnx.Module):
    """Image -> latent moments (mean and log-variance stacked on channels)."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1, rngs=rngs)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, site="encoder.mid_block", rngs=rngs)
        self.conv_norm_out = GroupNorm(ch[-1], g)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1, rngs=rngs)

    def __call__(self, x, quant=None):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x, quant)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent -> image."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1, rngs=rngs)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, site="decoder.mid_block", rngs=rngs)
        self.up_blocks = nnx.List([
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1, rngs=rngs)
            for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(ch[-1], g)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1, rngs=rngs)

    def __call__(self, z, quant=None):
        x = self.mid_block(self.conv_in(z), quant)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The VAE module: ``encode``, ``decode`` and ``__call__`` (reconstruction of the mean)."""

    def __init__(self, config: Config, rngs: nnx.Rngs):
        self.config = config
        lc = config.latent_channels
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.quant_conv = Conv2d(2 * lc, 2 * lc, 1, rngs=rngs) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(lc, lc, 1, rngs=rngs) if config.use_post_quant_conv else None

    def _check(self, x, channels, what):
        f = self.config.downsample_factor if what == "image" else 1
        if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"VAE: {what} must be (B, H, W, {channels}) channels-last"
                             f"{f' with H, W multiples of {f}' if f > 1 else ''}; got {tuple(x.shape)}")

    def encode(self, x, quant=None):
        """Image (B, H, W, C) in [-1, 1] -> ``(mean, logvar)`` of the latent distribution."""
        self._check(x, self.config.in_channels, "image")
        m = self.encoder(x.astype(jnp.dtype(self.config.dtype)), quant)
        if self.quant_conv is not None:
            m = self.quant_conv(m)
        mean, logvar = jnp.split(m, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z, quant=None):
        """Latent (B, h, w, latent_channels) (unscaled) -> image (B, h·f, w·f, out_channels)."""
        self._check(z, self.config.latent_channels, "latent")
        z = z.astype(jnp.dtype(self.config.dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, quant)

    def __call__(self, x, quant=None):
        return self.decode(self.encode(x, quant)[0], quant)


def build(config: Config, rngs: nnx.Rngs) -> AutoencoderKL:
    """The VAE module for ``config`` with random params from ``rngs``."""
    return AutoencoderKL(config, rngs)


class VAEModel(Model):
    """:class:`~jdq.models.base.Model` with the VAE's entry points."""

    def encode(self, x, quant=None):
        """``(mean, logvar)`` of the latent distribution of images ``x``."""
        return self.call("encode", x, quant=quant)

    def decode(self, z, quant=None):
        """Images from unscaled latents ``z``."""
        return self.call("decode", z, quant=quant)

    def encode_latents(self, x, key=None, quant=None):
        """Diffusion-space latents ``(z - shift) · scale`` of images ``x`` (``z`` sampled if ``key``, else the mean)."""
        mean, logvar = self.encode(x, quant=quant)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def decode_latents(self, z, quant=None):
        """Images from diffusion-space latents: ``decode(z / scale + shift)``."""
        return self.decode(z / self.config.scaling_factor + (self.config.shift_factor or 0.0), quant=quant)


def from_config(config: Config, key=None, abstract: bool = False) -> VAEModel:
    """A :class:`VAEModel` of ``config``: random params from ``key``, or abstract ones."""
    return VAEModel.abstract(config, build) if abstract else VAEModel.create(config, build, key)
