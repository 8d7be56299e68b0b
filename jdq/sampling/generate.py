"""Sampling a jdq model end to end: family conventions, batching, data parallelism, progress.

:func:`generate` takes a :class:`jdq.models.Model` and per-sample conditions and returns samples
as numpy. Each family's conventions come from its :class:`jdq.models.spec.FamilySpec`:

===========  =============================  ===================  ==========================================
family       condition (``cond``)           default sampler      guidance
===========  =============================  ===================  ==========================================
``dit``      int class labels ``[N]``        DDPM, 250 steps      null class ``num_classes``; the official
                                                                 checkpoints guide only the first 3 eps
                                                                 channels (as ``forward_with_cfg``), other
                                                                 DiTs all eps channels; variance: cond.
``pixart``   ``{"text_emb": [N, L, D],``     DPM-Solver++(2M),    all output channels (the learned variance is
             ``"mask": [N, L]}``             20 steps, cfg 4.5    then dropped), as diffusers' pipeline
``sd3``      ``{"text_emb": [N, L, D],``     flow Euler, 28       all channels
             ``"pooled": [N, P]}``           steps, shift 3, 7.0
===========  =============================  ===================  ==========================================

Batches are padded to a fixed size (one compilation), split over a device mesh when one is given,
and sample ``j`` always uses key ``fold_in(key(seed), j)``: the same seed gives the same images
whatever the batch size or the number of devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdq import sharding
from jdq.models.spec import spec_of
from jdq.sampling.loop import sample, sample_keys, step_progress
from jdq.sampling.samplers import Sampler, make_sampler

def family_defaults(model) -> dict:
    """The family's sampling defaults: ``sampler``, ``steps``, ``guidance`` (and ``shift``), from its spec."""
    return dict(spec_of(model).defaults)


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """``fn(params, x, t, cond, quant=)`` for a model of a family (hashable: compiled once per model)."""

    model: Any
    family: str

    def __call__(self, params, x, t, cond, quant=None):
        return spec_of(self.family).denoise(self.model, params, x, t, cond, quant=quant)


def sample_shape(model) -> tuple[int, int, int]:
    """The per-sample ``(H, W, C)`` the model denoises (latent or pixel)."""
    return tuple(spec_of(model).sample_shape(model.config))


def guided_channels(model) -> int | None:
    """How many leading output channels classifier-free guidance acts on (``None``: all), per the family's spec."""
    return spec_of(model).guided_channels(model.config)


def null_condition(model, cond):
    """The unconditional input for guidance (DiT: its null class for every sample), per the family's spec."""
    make = spec_of(model).null_condition
    if make is None:
        raise ValueError(f"a {model.family} model needs explicit unconditional (negative) embeddings for guidance")
    return make(model.config)


def resolve_sampler(model, sampler: Sampler | str | None = None, steps: int | None = None, *,
                    eta: float = 0.0, shift: float | None = None, clip_denoised: bool = False) -> Sampler:
    """A :class:`Sampler` from a name and step count, filling in the family's defaults."""
    if isinstance(sampler, Sampler):
        return sampler
    spec = spec_of(model)
    d = spec.defaults
    name = sampler or d.get("sampler", "ddpm")
    if spec.flow != (name in ("euler", "flow-euler")):
        kind = "flow-matching (euler)" if spec.flow else "noise-prediction (ddpm, ddim, dpm++2m)"
        raise ValueError(f"sampler {name!r} does not fit a {model.family} model: it needs a {kind} sampler")
    return make_sampler(name, steps or d.get("steps", 50), eta=eta, shift=shift or d.get("shift", 3.0),
                        clip_denoised=clip_denoised)


def _take(tree, idx):
    return jax.tree.map(lambda a: np.asarray(a)[idx], tree)


def generate(model, cond, *, uncond=None, sampler: Sampler | str | None = None, steps: int | None = None,
             guidance: float | None = None, seed: int = 0, batch_size: int = 16, quant=None,
             mesh=None, progress: bool = True, clip_denoised: bool = False, eta: float = 0.0,
             shift: float | None = None, params=None, first_index: int = 0) -> np.ndarray:
    """Samples ``[N, H, W, C]`` (float32 numpy) of ``model`` for the ``N`` conditions in ``cond``.

    ``uncond``: the unconditional input for guidance (DiT: the null class by default; PixArt-Σ and
    SD3: required when ``guidance > 1``). ``quant``: a quantizer (``plan.bind(state)``) or ``None``.
    ``mesh``: a :func:`jdq.sharding.batch_mesh` for data parallelism (``None``: one device).
    ``params``: override the model's params (e.g. cast to bfloat16). ``first_index``: the index
    of ``cond``'s first sample in a larger run (sample ``j`` of ``cond`` uses the key of
    ``first_index + j``), so a run sampled in pieces gets the same images as in one call.
    """
    guidance = spec_of(model).defaults.get("guidance", 1.0) if guidance is None else float(guidance)
    smp = resolve_sampler(model, sampler, steps, eta=eta, shift=shift, clip_denoised=clip_denoised)
    leaves = jax.tree.leaves(cond)
    if not leaves:
        raise ValueError("generate: cond is empty")
    n = int(np.shape(leaves[0])[0])
    if n == 0:
        raise ValueError("generate: no samples requested")
    if guidance != 1.0 and uncond is None:
        uncond = null_condition(model, cond)
    if guidance == 1.0:
        uncond = None
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bs = sharding.padded_size(min(batch_size, n), mesh)
    shape = sample_shape(model)
    fn = Denoiser(model, model.family)
    params = model.params if params is None else params
    params = sharding.replicate(params, mesh)
    quant = sharding.replicate(quant, mesh)
    if uncond is not None:
        uncond = sharding.replicate(jax.tree.map(jnp.asarray, uncond), mesh)
    multi = mesh is not None and mesh.devices.size > 1
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=-(-n // bs) * smp.num_steps, desc=f"sampling {n} ({smp.kind}, {smp.num_steps} steps)",
                   unit="step", leave=False)
    try:
        for start in range(0, n, bs):
            idx = np.minimum(np.arange(start, start + bs), n - 1)  # pad the last batch by repeating
            c = sharding.shard_batch(jax.tree.map(jnp.asarray, _take(cond, idx)), mesh)
            keys = sharding.shard_batch(sample_keys(seed, bs, first_index + start), mesh)
            step_hook = (lambda i: bar.update(1)) if (bar is not None and not multi) else None
            if step_hook is not None:
                with step_progress(step_hook):
                    x = sample(fn, params, smp, c, keys, shape, uncond=uncond, guidance=guidance,
                               guided_channels=guided_channels(model), quant=quant, progress=True)
                    x = np.asarray(x)
            else:
                x = np.asarray(sample(fn, params, smp, c, keys, shape, uncond=uncond, guidance=guidance,
                                      guided_channels=guided_channels(model), quant=quant))
                if bar is not None:
                    bar.update(smp.num_steps)
            out.append(x[: min(bs, n - start)])
    finally:
        if bar is not None:
            bar.close()
    return np.concatenate(out, axis=0)


def generate_classes(model, labels, **kwargs) -> np.ndarray:
    """:func:`generate` for a class-conditional DiT: ``labels`` is an int array ``[N]``."""
    labels = np.asarray(labels, np.int32)
    if not spec_of(model).class_conditional:
        raise ValueError(f"class labels condition a DiT; this model is a {model.family}")
    k = model.config.num_classes
    bad = labels[(labels < 0) | (labels >= k)]
    if bad.size:
        raise ValueError(f"class label {int(bad[0])} is out of range: this model has classes 0..{k - 1}")
    return generate(model, labels, **kwargs)
