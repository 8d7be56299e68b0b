"""Calibration along the floating-point sampler's trajectories: the loop that feeds :mod:`jdq.quant.calibrate`.

:func:`calibrate` runs the FP sampler from the calibration samples' own noise (sample ``j``:
``fold_in(key(seed), j)``), one compiled ``lax.scan`` per chunk of ``settings.batch_size``
samples. Every step, a :class:`~jdq.quant.calibrate.TrajectoryCollector` records every operand's
statistics and an :class:`~jdq.quant.calibrate.Accumulator` folds them into the step's slot inside
the loop (the reduction over steps and samples happens on the device, inside jit; no Python loop
over steps or operands at run time). Chunks are merged on the host; after each the accumulator
is saved to ``path`` (safetensors), so an interrupted calibration resumes at the next chunk —
with the same settings and the same samples (a file from other settings is refused).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdq.quant import calibrate as C
from jdq.sampling.loop import _report_step, guided_output, initial_noise, sample_keys, step_noise, step_progress


def _step_stats(fn, params, x, t, cond, uncond, scale, rows, *, guided, channel_axis, settings):
    collector = C.TrajectoryCollector(settings.stats, settings.roles, settings.split_bits)
    separate = settings.cfg == "apart"
    collector.rows = rows if (uncond is None or separate) else jnp.concatenate([rows, rows])
    out = guided_output(fn, params, x, t, cond, uncond, scale, quant=collector, guided_channels=guided,
                        channel_axis=channel_axis, separate=separate)
    return out, collector.finish()


def _trajectory(fn, params, sampler, keys, cond, uncond, scale, mask, slots, *, shape, guided, channel_axis,
                settings, num_slots, progress):
    n = sampler.num_steps
    x = initial_noise(keys, shape)
    b = x.shape[0]
    t0 = jnp.full((b,), sampler.model_timesteps(0), jnp.float32)
    abstract = jax.eval_shape(lambda: _step_stats(fn, params, x, t0, cond, uncond, scale, mask[0], guided=guided,
                                                  channel_axis=channel_axis, settings=settings)[1])
    acc = C.Accumulator.empty(abstract, num_slots)

    def body(carry, i):
        x, memory, acc = carry
        t = jnp.full((b,), sampler.model_timesteps(i), jnp.float32)
        out, stats = _step_stats(fn, params, x, t, cond, uncond, scale, mask[i], guided=guided,
                                 channel_axis=channel_axis, settings=settings)
        acc = C.Accumulator.update(acc, stats, slots[i])
        noise = step_noise(keys, i, shape) if sampler.stochastic else None
        x, memory = sampler.update(i, x, out, memory, noise, channel_axis)
        if progress:
            jax.debug.callback(_report_step, i)
        return (x, memory, acc), None

    (_, _, acc), _ = jax.lax.scan(body, (x, sampler.init_carry(x), acc), jnp.arange(n))
    return acc


_trajectory_jit = jax.jit(_trajectory, static_argnames=("fn", "shape", "guided", "channel_axis", "settings",
                                                        "num_slots", "progress"))


def _fingerprint(settings, sampler, cond, uncond, guidance, seed, params) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([settings.to_dict(), sampler.kind, sampler.num_steps, float(guidance), int(seed)],
                        sort_keys=True).encode())
    for leaf in jax.tree.leaves((cond, uncond, sampler.timesteps)):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    for leaf in jax.tree.leaves(params)[:8]:  # enough to tell models apart cheaply
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes()[:4096])
    return h.hexdigest()[:16]


def calibrate(fn, params, sampler, cond, shape, settings: C.CalibrationSettings | None = None, *, uncond=None,
              guidance: float = 1.0, guided_channels: int | None = None, seed: int = 1, path=None,
              progress: bool = False):
    """Statistics ``{operand key: {name: [S, ...], "step": [S]}}`` of denoiser ``fn`` along the FP sampler's trajectories.

    ``fn(params, x, t, cond, quant=)``: the denoiser (``jdq.sampling.generate.Denoiser``), ``shape``
    the per-sample shape. ``cond``: the calibration conditions (a pytree with a leading sample axis; the first
    ``settings.samples`` are used); ``uncond``/``guidance``: classifier-free guidance (statistics
    of both halves, together or apart as ``settings.cfg`` says). ``path``: a safetensors file to
    save to after every chunk and resume from. ``progress``: a tqdm bar over chunks × steps.
    """
    settings = settings or C.CalibrationSettings()
    n_avail = int(np.shape(jax.tree.leaves(cond)[0])[0])
    n = min(settings.samples or n_avail, n_avail)
    cond = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[:n]), cond)
    use_cfg = uncond is not None and guidance != 1.0
    uncond = jax.tree.map(jnp.asarray, uncond) if use_cfg else None
    s = sampler.num_steps
    mask = C.selection_mask(settings, s, n)
    steps = C.observed_steps(mask)
    slots = np.full((s,), len(steps), np.int32)
    slots[steps] = np.arange(len(steps), dtype=np.int32)
    bs = settings.batch_size
    chunks = [(a, min(a + bs, n)) for a in range(0, n, bs)]
    fp = _fingerprint(settings, sampler, cond, uncond, guidance, seed, params)
    acc, done = None, 0
    if path is not None and Path(path).is_file():
        acc, meta = C.load_stats(path)
        if meta.get("fingerprint") != fp:
            raise ValueError(f"{path} holds a calibration with other settings, samples or model "
                             f"(fingerprint {meta.get('fingerprint')} ≠ {fp}); remove it or choose another file")
        done = int(meta["chunks_done"])
        acc = {k: {name: v for name, v in st.items() if name != C.STEP_KEY} for k, st in acc.items()}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(chunks) * s, initial=done * s, desc=f"calibrating on {n} samples ({s} steps)",
                   unit="step", leave=False)
    try:
        for c in range(done, len(chunks)):
            a, b = chunks[c]
            keys = sample_keys(seed, b - a, a)
            cc = jax.tree.map(lambda v: v[a:b], cond)
            kw = dict(shape=tuple(shape), guided=guided_channels, channel_axis=-1, settings=settings,
                      num_slots=len(steps), progress=bar is not None)
            args = (fn, params, sampler, keys, cc, uncond, jnp.float32(guidance),
                    jnp.asarray(mask[:, a:b], jnp.float32), jnp.asarray(slots))
            if bar is not None:
                with step_progress(lambda i: bar.update(1)):
                    part = jax.device_get(_trajectory_jit(*args, **kw))
            else:
                part = jax.device_get(_trajectory_jit(*args, **kw))
            acc = part if acc is None else jax.device_get(C.Accumulator.merge(acc, part))
            if path is not None:
                C.save_stats(path, acc, {"fingerprint": fp, "chunks_done": c + 1, "chunks": len(chunks),
                                         "settings": settings.to_dict(), "steps": steps.tolist()})
    finally:
        if bar is not None:
            bar.close()
    return C.finalize(acc, steps)
