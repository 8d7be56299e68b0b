"""Sampling a jdq model end to end: family conventions, batching, data parallelism, progress.

:func:`generate` takes a :class:`jdq.models.Model` and per-sample conditions and returns samples
as numpy. It knows each family's conventions:

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
from jdq.sampling.loop import sample, sample_keys, step_progress
from jdq.sampling.samplers import Sampler, make_sampler

#: Per-family defaults: sampler, steps, guidance scale (and flow shift).
FAMILY_DEFAULTS = {
    "dit": {"sampler": "ddpm", "steps": 250, "guidance": 4.0},
    "pixart": {"sampler": "dpm++2m", "steps": 20, "guidance": 4.5},
    "sd3": {"sampler": "euler", "steps": 28, "guidance": 7.0, "shift": 3.0},
}


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """``fn(params, x, t, cond, quant=)`` for a model of a family (hashable: compiled once per model)."""

    model: Any
    family: str

    def __call__(self, params, x, t, cond, quant=None):
        if self.family == "dit":
            return self.model.apply(params, x, t, cond, quant=quant)
        if self.family == "pixart":
            return self.model.apply(params, x, t, cond["text_emb"], cond.get("mask"), quant=quant)
        if self.family == "sd3":
            return self.model.apply(params, x, t, cond["text_emb"], cond["pooled"], quant=quant)
        raise ValueError(f"cannot sample a model of family {self.family!r}")


def sample_shape(model) -> tuple[int, int, int]:
    """The per-sample ``(H, W, C)`` the model denoises (latent or pixel)."""
    cfg = model.config
    family = model.family
    if family == "dit":
        return (cfg.input_size, cfg.input_size, cfg.in_channels)
    if family in ("pixart", "sd3"):
        return (cfg.sample_size, cfg.sample_size, cfg.in_channels)
    raise ValueError(f"cannot sample a model of family {family!r}")


def guided_channels(model) -> int | None:
    """How many leading output channels classifier-free guidance acts on (``None``: all).

    facebookresearch/DiT's ``forward_with_cfg`` guides 3 of the 4 eps channels "for exact
    reproducibility"; a DiT converted from it (``config.source``) keeps that. Other DiTs guide
    their ``in_channels`` eps channels (diffusers' DiT pipeline); PixArt-Σ and SD3 guide all.
    """
    if model.family != "dit":
        return None
    cfg = model.config
    if cfg.source == "facebookresearch/DiT" and cfg.in_channels == 4:
        return 3
    return cfg.in_channels


def null_condition(model, cond):
    """The unconditional input for guidance: DiT's null class (``num_classes``) for every sample."""
    if model.family == "dit":
        if not model.config.null_class:
            raise ValueError("this DiT has no null class, so it cannot use classifier-free guidance (use guidance 1)")
        return jnp.full((1,), model.config.num_classes, jnp.int32)
    raise ValueError(f"a {model.family} model needs explicit unconditional (negative) embeddings for guidance")


def resolve_sampler(model, sampler: Sampler | str | None = None, steps: int | None = None, *,
                    eta: float = 0.0, shift: float | None = None, clip_denoised: bool = False) -> Sampler:
    """A :class:`Sampler` from a name and step count, filling in the family's defaults."""
    if isinstance(sampler, Sampler):
        return sampler
    d = FAMILY_DEFAULTS.get(model.family, {})
    name = sampler or d.get("sampler", "ddpm")
    expects_flow = model.family == "sd3"
    if expects_flow != (name in ("euler", "flow-euler")):
        kind = "flow-matching (euler)" if expects_flow else "noise-prediction (ddpm, ddim, dpm++2m)"
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
    d = FAMILY_DEFAULTS.get(model.family, {})
    guidance = d.get("guidance", 1.0) if guidance is None else float(guidance)
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
    if model.family != "dit":
        raise ValueError(f"class labels condition a DiT; this model is a {model.family}")
    k = model.config.num_classes
    bad = labels[(labels < 0) | (labels >= k)]
    if bad.size:
        raise ValueError(f"class label {int(bad[0])} is out of range: this model has classes 0..{k - 1}")
    return generate(model, labels, **kwargs)
