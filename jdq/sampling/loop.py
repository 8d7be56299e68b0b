"""The sampling loop: one jitted ``lax.scan`` over the steps, guidance and quantization inside.

A denoiser is any pure function ``fn(params, x, t, cond, quant=q) -> out`` (``Model.apply`` of
``jdq.models``): ``x`` is the batch of samples (``[B, *shape]``), ``t`` a ``[B]`` float32
timestep, ``cond`` a pytree with a leading batch axis (class labels, text embeddings, ...),
``out`` the model output (``C`` channels, or ``2C`` with a learned variance).

Inside the scan, step ``i`` calls the model with ``quant.at_step(i, num_steps)``, so
time-grouped quantization state (a leading group axis picked by the step index) is selected per
step inside the compiled loop, and a quantizer is an ordinary argument (a new state does not
recompile; ``jax.vmap`` over a stacked state runs a precision sweep in one call).

Randomness is per sample: sample ``j`` of a batch uses key ``keys[j]`` (see
:func:`sample_keys`) for its initial noise and its per-step noise, so a sample does not depend
on the batch it is in, on the batch size, or on how the batch is split over devices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdq.quant.calibrate import StatsCollector, operand_stats
from jdq.quant.hoist import hoist_weights
from jdq.sampling.samplers import Sampler

Array = jax.Array


def sample_keys(seed: int | Array, num: int, start: int = 0) -> Array:
    """Per-sample PRNG keys ``fold_in(key(seed), start + j)`` for ``j < num``."""
    base = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    return jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(start, start + num, dtype=jnp.uint32))


def initial_noise(keys: Array, shape: tuple[int, ...]) -> Array:
    """The starting sample ``x_T ~ N(0, I)`` of each key (float32, ``[B, *shape]``)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape, jnp.float32))(keys)


def step_noise(keys: Array, i, shape: tuple[int, ...]) -> Array:
    """The noise a stochastic sampler adds at step ``i`` (float32, ``[B, *shape]``)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, 1), i), shape, jnp.float32))(keys)


def at_step(quant, i, num_steps: int):
    """``quant`` at sampler step ``i`` (``Quantizer.at_step``); quantizers without steps pass through."""
    if quant is None or not hasattr(quant, "at_step"):
        return quant
    return quant.at_step(i, num_steps)


def guided_output(fn: Callable, params, x: Array, t: Array, cond, uncond=None, scale=1.0, *, quant=None,
                  guided_channels: int | None = None, channel_axis: int = -1, separate: bool = False) -> Array:
    """The model output with classifier-free guidance ``u + s (c - u)`` when ``uncond`` is given.

    The conditional and unconditional inputs run as one batch ``[cond; uncond]`` (as DiT's
    ``forward_with_cfg`` and diffusers' pipelines do), or as two calls with ``separate=True`` (so
    dynamic activation quantization sees each half alone, as ViDiT-Q does). Guidance is applied to
    the first ``guided_channels`` output channels (DiT's official code guides only 3 of the 4 eps
    channels "for exact reproducibility"; ``None`` guides all of them, as PixArt-Σ and SD3 do); the
    other channels, including a learned variance, are the conditional ones.
    """
    if uncond is None:
        return fn(params, x, t, cond, quant=quant)
    b = x.shape[0]
    uncond = jax.tree.map(lambda u, c: jnp.broadcast_to(u, c.shape), uncond, cond)
    if separate:
        out_c = fn(params, x, t, cond, quant=quant)
        out_u = fn(params, x, t, uncond, quant=quant)
    else:
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
        out = fn(params, jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both, quant=quant)
        out_c, out_u = out[:b], out[b:]
    guided = out_u + jnp.asarray(scale, out_c.dtype) * (out_c - out_u)
    if guided_channels is None:
        return guided
    axis = channel_axis % out_c.ndim
    idx = jnp.arange(out_c.shape[axis]).reshape([-1 if d == axis else 1 for d in range(out_c.ndim)])
    return jnp.where(idx < guided_channels, guided, out_c)


def _scan(fn, params, sampler: Sampler, keys, cond, uncond, scale, quant, *, shape, guided_channels,
          channel_axis, separate_cfg, collect, stat_fn, stat_roles, progress, hoist=False):
    n = sampler.num_steps
    x = initial_noise(keys, shape)
    b = x.shape[0]
    if hoist and quant is not None and not collect:  # weights quantized once, outside the loop
        quant = hoist_weights(fn, params, x[:1], jnp.full((1,), sampler.model_timesteps(0), jnp.float32),
                              jax.tree.map(lambda a: a[:1], cond), quant, n)

    def body(carry, i):
        x, memory = carry
        t = jnp.full((b,), sampler.model_timesteps(i), jnp.float32)
        if collect:
            q = StatsCollector(stat_fn, stat_roles)
        else:
            q = at_step(quant, i, n)
        out = guided_output(fn, params, x, t, cond, uncond, scale, quant=q, guided_channels=guided_channels,
                            channel_axis=channel_axis, separate=separate_cfg)
        noise = step_noise(keys, i, shape) if sampler.stochastic else None
        x, memory = sampler.update(i, x, out, memory, noise, channel_axis)
        if progress:
            jax.debug.callback(_report_step, i)
        return (x, memory), (q.stats if collect else None)

    (x, _), stats = jax.lax.scan(body, (x, sampler.init_carry(x)), jnp.arange(n))
    return (x, stats) if collect else x


_PROGRESS_HOOKS: list[Callable] = []


def _report_step(i):
    for hook in _PROGRESS_HOOKS:
        hook(int(i))


class step_progress:
    """Context manager: call ``hook(i)`` on the host after each sampler step inside it.

    The compiled loop calls one fixed module function (so a new hook does not recompile).
    """

    def __init__(self, hook: Callable[[int], Any]):
        self.hook = hook

    def __enter__(self):
        _PROGRESS_HOOKS.append(self.hook)
        return self

    def __exit__(self, *exc):
        _PROGRESS_HOOKS.remove(self.hook)
        return False


_STATIC = ("fn", "shape", "guided_channels", "channel_axis", "separate_cfg", "collect", "stat_fn", "stat_roles", "progress",
           "hoist")
_scan_jit = jax.jit(_scan, static_argnames=_STATIC)


def sample(fn: Callable, params, sampler: Sampler, cond, keys: Array, shape: tuple[int, ...], *, uncond=None,
           guidance: float = 1.0, guided_channels: int | None = None, quant=None, channel_axis: int = -1,
           separate_cfg: bool = False, progress: bool = False, hoist_weights: bool = True) -> Array:
    """Run ``sampler`` from ``N(0, I)`` with the denoiser ``fn``; returns ``[B, *shape]`` float32.

    ``keys``: one PRNG key per sample (:func:`sample_keys`); ``cond``/``uncond``: pytrees with a
    leading batch axis (``uncond`` may have batch 1; it is broadcast). Guidance runs when
    ``uncond`` is given and ``guidance != 1``. ``quant``: ``None`` or a quantizer
    (``plan.bind(state)``), stepped with ``at_step`` inside the loop. ``progress=True`` reports each
    finished step to the hooks of :class:`step_progress` (e.g. a tqdm bar). The whole loop is one
    jitted ``lax.scan``; inputs placed with a batch sharding (:mod:`jdq.sharding`) run
    data-parallel. ``hoist_weights`` (default): the plan's weights are quantized once before the
    loop, not at every step (:func:`jdq.quant.hoist.hoist_weights`; the same values).
    """
    _check(sampler, cond, keys)
    use_cfg = uncond is not None and guidance != 1.0
    return _scan_jit(fn, params, sampler, keys, cond, uncond if use_cfg else None, jnp.float32(guidance), quant,
                     shape=tuple(shape), guided_channels=guided_channels, channel_axis=channel_axis,
                     separate_cfg=separate_cfg, collect=False, stat_fn=operand_stats, stat_roles=None,
                     progress=bool(progress), hoist=bool(hoist_weights))


def collect_sampler_stats(fn: Callable, params, sampler: Sampler, cond, keys: Array, shape: tuple[int, ...], *,
                          uncond=None, guidance: float = 1.0, guided_channels: int | None = None,
                          channel_axis: int = -1, stat_fn=operand_stats, roles=None):
    """Run the floating-point sampler and collect every operand's statistics at every step.

    Returns ``(samples, stats)`` where ``stats`` is ``{operand key: {name: [num_steps, ...]}}``
    (:class:`jdq.quant.StatsCollector` inside the scan body, statistics returned as scan outputs),
    the layout ``plan.init`` and time-grouped transforms expect. With guidance, statistics are
    taken over the joint ``[cond; uncond]`` batch.
    """
    _check(sampler, cond, keys)
    use_cfg = uncond is not None and guidance != 1.0
    return _scan_jit(fn, params, sampler, keys, cond, uncond if use_cfg else None, jnp.float32(guidance), None,
                     shape=tuple(shape), guided_channels=guided_channels, channel_axis=channel_axis,
                     separate_cfg=False, collect=True, stat_fn=stat_fn, stat_roles=None if roles is None else tuple(roles),
                     progress=False)


def _check(sampler, cond, keys):
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a jdq.sampling.Sampler, got {type(sampler).__name__}")
    b = keys.shape[0]
    for leaf in jax.tree.leaves(cond):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != b:
            raise ValueError(f"cond leaves need a leading batch axis of {b} (one per key); got shape {np.shape(leaf)}")
