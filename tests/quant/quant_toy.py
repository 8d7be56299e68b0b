"""A tiny transformer block built from jdq.models.layers, shared by the jdq.quant tests."""

import jax
import jax.numpy as jnp

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


def make_params(key):
    """Random parameters of :func:`toy_block` with a few large activation channels (outliers)."""
    ks = jax.random.split(key, 8)
    n = jax.random.normal
    g1 = 1.0 + 0.1 * n(ks[6], (DIM,))
    g1 = g1.at[jnp.array([3, 17])].set(12.0)  # channel outliers after LN, as in DiTs
    return {
        "ln1_g": g1, "ln1_b": 0.1 * n(ks[7], (DIM,)),
        "qkv_w": n(ks[0], (DIM, 3 * DIM)) / DIM**0.5, "qkv_b": jnp.zeros(3 * DIM),
        "proj_w": n(ks[1], (DIM, DIM)) / DIM**0.5, "proj_b": jnp.zeros(DIM),
        "ln2_g": jnp.ones(DIM), "ln2_b": jnp.zeros(DIM),
        "fc1_w": n(ks[2], (DIM, HIDDEN)) / DIM**0.5, "fc1_b": 0.1 * n(ks[3], (HIDDEN,)),
        "fc2_w": n(ks[4], (HIDDEN, DIM)) / HIDDEN**0.5, "fc2_b": jnp.zeros(DIM),
    }


#: Which parameter is the weight of which linear site.
WEIGHT_OF = {"attn.qkv": "qkv_w", "attn.proj": "proj_w", "mlp.fc1": "fc1_w", "mlp.fc2": "fc2_w"}


def toy():
    """(params, input) of the toy block: batch 2, 8 tokens, width 32."""
    p = make_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, DIM))
    return p, x
