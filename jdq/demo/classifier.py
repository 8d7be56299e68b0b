"""A small CNN that labels 28×28 Animal-MNIST images: the embedded model's class-fidelity metric.

"Does a sample of class c look like class c?" is the quality measure the demo reports for the
floating-point and the quantized model (the fraction of samples labelled with the class they
were conditioned on). Three 3×3 conv stages (32, 64, 128 channels; ReLU; 2×2 average pooling
after the first two), global average pooling, and a linear layer to 10 logits; a pure function
of a params dict, trained by :mod:`jdq.demo.train`. Inputs are in the diffusion model's range
``[-1, 1]``, NHWC.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jdq.io import atomic_write

CHANNELS = (32, 64, 128)


def init(key: jax.Array, num_classes: int = 10, in_channels: int = 1) -> dict[str, jax.Array]:
    """Random params (He-normal convs, zero biases)."""
    params = {}
    keys = jax.random.split(key, len(CHANNELS) + 1)
    cin = in_channels
    for i, (k, cout) in enumerate(zip(keys, CHANNELS)):
        params[f"conv{i}.kernel"] = jax.random.normal(k, (3, 3, cin, cout), jnp.float32) * math.sqrt(2.0 / (9 * cin))
        params[f"conv{i}.bias"] = jnp.zeros((cout,), jnp.float32)
        cin = cout
    params["head.kernel"] = jax.random.normal(keys[-1], (cin, num_classes), jnp.float32) / math.sqrt(cin)
    params["head.bias"] = jnp.zeros((num_classes,), jnp.float32)
    return params


def _avg_pool2(x):
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def features(params, images: jax.Array) -> jax.Array:
    """The penultimate layer ``[B, 128]`` (global average of the last conv stage) of images in ``[-1, 1]``.

    These are the features of the embedded model's "Animal-FID" (``jdq eval``).
    """
    x = jnp.asarray(images, jnp.float32)
    for i in range(len(CHANNELS)):
        x = jax.lax.conv_general_dilated(x, params[f"conv{i}.kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + params[f"conv{i}.bias"])
        if i < len(CHANNELS) - 1:
            x = _avg_pool2(x)
    return x.mean(axis=(1, 2))


def logits(params, images: jax.Array) -> jax.Array:
    """Class logits ``[B, num_classes]`` of images ``[B, 28, 28, 1]`` in ``[-1, 1]``."""
    return features(params, images) @ params["head.kernel"] + params["head.bias"]


@jax.jit
def predict(params, images: jax.Array) -> jax.Array:
    """Predicted class ``[B]`` (int32)."""
    return jnp.argmax(logits(params, images), axis=-1).astype(jnp.int32)


def accuracy(params, images, labels, batch_size: int = 500) -> float:
    """Fraction of ``images`` whose predicted class equals ``labels``."""
    images, labels = np.asarray(images), np.asarray(labels)
    hits = 0
    for s in range(0, len(images), batch_size):
        hits += int(np.sum(np.asarray(predict(params, images[s:s + batch_size])) == labels[s:s + batch_size]))
    return hits / max(1, len(images))


def save(params, path) -> None:
    """Write params to a safetensors file atomically."""
    from safetensors.numpy import save_file

    flat = {k: np.asarray(v) for k, v in params.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={"model": "jdq.demo.classifier"}))


def load(path) -> dict[str, jax.Array]:
    """Read params written by :func:`save`, checking the expected names and shapes."""
    from safetensors.numpy import load_file

    flat = load_file(str(path))
    ref = jax.eval_shape(lambda: init(jax.random.key(0), num_classes=flat.get("head.bias", np.zeros(10)).shape[0]))
    if set(flat) != set(ref):
        raise KeyError(f"{path}: classifier params {sorted(flat)} do not match the expected {sorted(ref)}")
    for k, v in ref.items():
        if flat[k].shape != v.shape:
            raise ValueError(f"{path}: param {k!r} has shape {flat[k].shape}, expected {v.shape}")
    return {k: jnp.asarray(v) for k, v in flat.items()}
