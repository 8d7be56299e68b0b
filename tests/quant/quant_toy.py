"""A tiny transformer block built from jdq.models.layers, shared by the jdq.quant tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdq.models.layers import attention, qlinear

DIM, HEADS, HIDDEN = 32, 2, 64


def layer_norm(x, gamma=None, beta=None, eps=1e-6):
    """LayerNorm over the last axis with an optional affine (so balancing can fold into it)."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / jnp.sqrt(var + eps)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


def toy_block(p, x, quant=None):
    """Pre-LN attention + MLP block: operands of attn.qkv, attn.qk, attn.pv, attn.proj, mlp.fc1, mlp.fc2."""
    b, n, d = x.shape
    h = layer_norm(x, p["ln1_g"], p["ln1_b"])
    qkv = qlinear(h, p["qkv_w"], p["qkv_b"], site="attn.qkv", quant=quant)
    q, k, v = jnp.split(qkv.reshape(b, n, 3 * HEADS, d // HEADS), 3, axis=2)
    a = attention(q, k, v, site="attn", quant=quant).reshape(b, n, d)
    x = x + qlinear(a, p["proj_w"], p["proj_b"], site="attn.proj", quant=quant)
    h = layer_norm(x, p["ln2_g"], p["ln2_b"])
    h = jax.nn.gelu(qlinear(h, p["fc1_w"], p["fc1_b"], site="mlp.fc1", quant=quant))
    return x + qlinear(h, p["fc2_w"], p["fc2_b"], site="mlp.fc2", quant=quant, act_role="post_gelu")


def make_params(seed=0):
    """Random parameters of :func:`toy_block` with a few large activation channels (outliers).

    Drawn with numpy (jax.random would compile a kernel per shape, slow on a busy CPU).
    """
    rng = np.random.default_rng(seed)
    n = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    g1 = 1.0 + 0.1 * n(DIM)
    g1[[3, 17]] = 12.0  # channel outliers after LN, as in DiTs
    p = {
        "ln1_g": g1, "ln1_b": 0.1 * n(DIM),
        "qkv_w": n(DIM, 3 * DIM) / DIM**0.5, "qkv_b": np.zeros(3 * DIM, np.float32),
        "proj_w": n(DIM, DIM) / DIM**0.5, "proj_b": np.zeros(DIM, np.float32),
        "ln2_g": np.ones(DIM, np.float32), "ln2_b": np.zeros(DIM, np.float32),
        "fc1_w": n(DIM, HIDDEN) / DIM**0.5, "fc1_b": 0.1 * n(HIDDEN),
        "fc2_w": n(HIDDEN, DIM) / HIDDEN**0.5, "fc2_b": np.zeros(DIM, np.float32),
    }
    return {k: jnp.asarray(v) for k, v in p.items()}


def heavy(seed, shape):
    """Heavy-tailed data (Student-t, ν = 3) with log-normal channel scales along the last axis."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3.0, shape) * np.exp(rng.standard_normal(shape[-1:]))
    return jnp.asarray(x, jnp.float32)


#: Which parameter is the weight of which linear site.
WEIGHT_OF = {"attn.qkv": "qkv_w", "attn.proj": "proj_w", "mlp.fc1": "fc1_w", "mlp.fc2": "fc2_w"}


def toy():
    """(params, input) of the toy block: batch 2, 8 tokens, width 32."""
    x = np.random.default_rng(1).standard_normal((2, 8, DIM)).astype(np.float32)
    return make_params(0), jnp.asarray(x)


@functools.cache
def toy_stats():
    """Per-operand statistics of one forward pass of the toy block (no step axis; computed once)."""
    from jdq.quant import collect_stats

    p, x = toy()
    return collect_stats(toy_block, p, x)[1]
