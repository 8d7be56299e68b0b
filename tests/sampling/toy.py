"""A tiny denoiser for sampler tests: two quantization sites, learned-variance output, class labels."""

import jax
import jax.numpy as jnp

from jdq.models.layers import qlinear

SHAPE = (4, 4, 1)  # per-sample (H, W, C), channels-last like jdq models
NUM_CLASSES = 3


def init(key=0):
    """Random params for :func:`apply`."""
    k = jax.random.split(jax.random.key(key), 5)
    d, h = 16, 32
    return {
        "w1": jax.random.normal(k[0], (d, h)) / 4.0,
        "b1": jax.random.normal(k[1], (h,)) * 0.1,
        "temb": jax.random.normal(k[2], (h,)),
        "yemb": jax.random.normal(k[3], (NUM_CLASSES + 1, h)),
        "w2": jax.random.normal(k[4], (h, 2 * d)) / 6.0,
    }


def apply(params, x, t, y, quant=None):
    """``out = [eps, v]`` (2 channels) of ``x`` ``[B, 4, 4, 1]`` at timestep ``t`` ``[B]`` and class ``y`` ``[B]``."""
    b = x.shape[0]
    h = qlinear(x.reshape(b, -1), params["w1"], params["b1"], site="fc1", quant=quant)
    h = jnp.tanh(h + params["temb"] * (t[:, None] / 1000.0) + params["yemb"][y])
    out = qlinear(h, params["w2"], site="fc2", quant=quant, act_role="post_gelu")
    eps, v = jnp.split(out, 2, axis=-1)
    return jnp.concatenate([eps.reshape(b, 4, 4, 1), jnp.tanh(v).reshape(b, 4, 4, 1)], axis=-1)
