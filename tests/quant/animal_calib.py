"""The embedded Animal-MNIST DiT with real calibration inputs ``x_t`` (shared by the search and GPTQ tests)."""

import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jdq
from jdq import quant as Q
from jdq.models.layers import sincos_pos_embed_2d, unpatchify

MODEL_DIR = Path(jdq.__file__).resolve().parent / "assets" / "animal_dit"


@functools.lru_cache(maxsize=1)
def model():
    """The embedded model (loaded once)."""
    m, _ = jdq.models.load(MODEL_DIR)
    return m


@functools.lru_cache(maxsize=4)
def calibration_batch(n: int, seed: int):
    """``(x_t, t, y, eps)``: real images noised at random timesteps, ``x_t = √ᾱ x_0 + √(1−ᾱ) ε`` (numpy)."""
    try:
        from jdq.demo.data import load_animal_mnist, to_model_range
        images, labels = load_animal_mnist()
    except FileNotFoundError as e:
        pytest.skip(f"Animal-MNIST is not installed: {e}")
    from jdq.sampling.schedules import alphas_cumprod, dit_betas

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), n, replace=False)
    x0 = to_model_range(images[idx])
    t = rng.integers(0, 1000, n)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    ac = alphas_cumprod(dit_betas(1000))[t].astype(np.float32)[:, None, None, None]
    x_t = (np.sqrt(ac) * x0 + np.sqrt(1 - ac) * eps).astype(np.float32)
    return x_t, t.astype(np.int32), labels[idx].astype(np.int32), eps


@functools.lru_cache(maxsize=2)
def layer_inputs(n: int, seed: int):
    """Every linear layer's real input on a calibration batch: ``{site: (n, tokens, in_features)}`` (float32)."""
    x_t, t, y, _ = calibration_batch(n, seed)
    m = model()
    _, stats = Q.collect_stats(m.apply, m.params, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(y),
                               stat_fn=lambda x, axis: {"x": x}, roles=Q.ACTIVATION_ROLES)
    return {key.split(":")[0]: np.asarray(s["x"]).reshape(n, -1, s["x"].shape[-1]) for key, s in stats.items()}


def weight(site: str) -> np.ndarray:
    """The ``(in, out)`` weight of a linear site, e.g. ``"blocks.3.mlp.fc1"``."""
    p = model().params
    for part in site.split("."):
        p = p[int(part) if part.isdigit() else part]
    return np.asarray(p["kernel"])


def module():
    """The model's NNX module (to call its blocks one at a time)."""
    return model().module()


def block_inputs(mod, x, t, y, block: int):
    """``(h, c)``: the residual stream entering ``blocks[block]`` and the conditioning vector."""
    cfg = mod.config
    h = mod.x_embedder(x) + jnp.asarray(sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size))
    c = mod.t_embedder(t) + mod.y_embedder(y)
    for b in mod.blocks[:block]:
        h = b(h, c)
    return h, c


def tail(mod, h, c, start: int):
    """The model output from the residual stream leaving ``blocks[start - 1]``."""
    cfg = mod.config
    for b in mod.blocks[start:]:
        h = b(h, c)
    h = mod.final_layer(h, c)
    return unpatchify(h, cfg.patch_size, cfg.grid_size, cfg.grid_size)

