"""Samplers as per-step coefficient tables plus one pure update rule each.

A :class:`Sampler` is a pytree: its tables (float32 arrays with one entry per step, step ``0``
being the first, noisiest one) are children, its kind and flags are static. The loop in
:mod:`jdq.sampling.loop` scans over the step index and calls :meth:`Sampler.update`.

* :func:`ddpm` — ancestral sampling of DiT/ADM (``p_sample_loop``) on a respaced process, with
  the model's *learned range* variance when the model outputs ``2C`` channels
  (``log σ² = f · log β_t + (1 - f) · log β̃_t``, ``f = (v + 1) / 2``), otherwise the fixed small
  (posterior) variance ``β̃_t``.
* :func:`ddim` — DDIM with ``η`` (ADM's ``ddim_sample_loop``; ``η = 0`` is deterministic).
* :func:`dpm_solver_pp_2m` — multistep DPM-Solver++ of order 2 (midpoint), as diffusers'
  ``DPMSolverMultistepScheduler`` with ``lower_order_final`` and a zero final sigma.
* :func:`flow_euler` — Euler steps of rectified flow, as diffusers'
  ``FlowMatchEulerDiscreteScheduler`` (SD3).

Coefficients are computed in float64 on the host and cast to float32 once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jdq.sampling import schedules

Array = jax.Array

#: The sampler names :func:`make_sampler` knows.
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "euler")


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A sampler: what the model sees at each step (``timesteps``) and how a step updates ``x``.

    ``kind`` is one of :data:`SAMPLERS`; ``prediction`` is ``"eps"`` (the model predicts noise,
    optionally with a learned variance in its second ``C`` channels) or ``"velocity"`` (flow
    matching). ``tables`` maps coefficient names to ``[num_steps]`` arrays. ``stochastic``
    samplers draw fresh noise every step. ``clip_denoised`` clips the ``x₀`` prediction to
    ``[-1, 1]`` (pixel-space models; DiT samples latents with it off).
    """

    kind: str
    timesteps: Any
    tables: Mapping[str, Any]
    prediction: str = "eps"
    stochastic: bool = False
    clip_denoised: bool = False
    description: str = ""

    @property
    def num_steps(self) -> int:
        """The number of model evaluations (steps)."""
        return int(np.shape(self.timesteps)[0])

    def tree_flatten(self):
        """Children: timesteps and coefficient tables; static: kind and settings."""
        keys = tuple(sorted(self.tables))
        children = (self.timesteps, tuple(self.tables[k] for k in keys))
        aux = (self.kind, keys, self.prediction, self.stochastic, self.clip_denoised, self.description)
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Rebuild from :meth:`tree_flatten`'s output."""
        kind, keys, prediction, stochastic, clip, description = aux
        timesteps, values = children
        return cls(kind, timesteps, dict(zip(keys, values)), prediction, stochastic, clip, description)

    def init_carry(self, x: Array) -> Array:
        """The solver's memory before the first step (DPM-Solver++'s previous ``x₀``; unused otherwise)."""
        return jnp.zeros_like(x)

    def update(self, i, x: Array, out: Array, carry: Array, noise: Array | None = None, channel_axis: int = -1):
        """One step: ``x`` at step ``i`` and the (guided) model output ``out`` -> ``(x_next, carry)``.

        ``out`` has ``C`` channels, or ``2C`` for a model with learned variance (the second half,
        used by :func:`ddpm` and dropped by the others). ``noise`` (standard normal, shaped like
        ``x``) is needed by stochastic samplers. ``i`` may be a traced integer.
        """
        c = {k: jnp.asarray(v)[i] for k, v in self.tables.items()}
        out = out.astype(jnp.float32)
        x = x.astype(jnp.float32)
        eps, var = _split_output(out, x, channel_axis)
        if self.stochastic and noise is None:
            raise ValueError(f"sampler {self.kind!r} is stochastic: pass noise")
        if self.kind == "ddpm":
            x0 = c["sqrt_recip_ac"] * x - c["sqrt_recipm1_ac"] * eps
            x0 = jnp.clip(x0, -1.0, 1.0) if self.clip_denoised else x0
            mean = c["coef_x0"] * x0 + c["coef_xt"] * x
            if var is None:
                log_var = c["min_log"]
            else:
                frac = (var + 1.0) / 2.0
                log_var = frac * c["max_log"] + (1.0 - frac) * c["min_log"]
            return mean + c["nonzero"] * jnp.exp(0.5 * log_var) * noise, carry
        if self.kind == "ddim":
            x0 = c["sqrt_recip_ac"] * x - c["sqrt_recipm1_ac"] * eps
            if self.clip_denoised:
                x0 = jnp.clip(x0, -1.0, 1.0)
                eps = (c["sqrt_recip_ac"] * x - x0) / c["sqrt_recipm1_ac"]
            x_next = c["coef_x0"] * x0 + c["coef_eps"] * eps
            if self.stochastic:
                x_next = x_next + c["sigma"] * noise
            return x_next, carry
        if self.kind == "dpm++2m":
            x0 = (x - c["sigma_s"] * eps) / c["alpha_s"]
            x0 = jnp.clip(x0, -1.0, 1.0) if self.clip_denoised else x0
            x_next = c["coef_x"] * x + c["coef_d0"] * x0 + c["coef_d1"] * (x0 - carry)
            return x_next, x0
        if self.kind == "euler":
            return x + c["dt"] * eps, carry
        raise ValueError(f"unknown sampler kind {self.kind!r}; known: {SAMPLERS}")

    def model_timesteps(self, i) -> Array:
        """The timestep the model is evaluated at in step ``i`` (float32)."""
        return jnp.asarray(self.timesteps, jnp.float32)[i]


def _split_output(out, x, channel_axis):
    """``(eps, var_values)`` from a model output of ``C`` or ``2C`` channels (``var_values`` may be None)."""
    c_out, c_in = out.shape[channel_axis], x.shape[channel_axis]
    if c_out == c_in:
        return out, None
    if c_out == 2 * c_in:
        eps, var = jnp.split(out, 2, axis=channel_axis)
        return eps, var
    raise ValueError(f"model output has {c_out} channels on axis {channel_axis}; the sample has {c_in} (expected {c_in} or {2 * c_in})")


def _f32(tables):
    return {k: np.asarray(v, np.float64).astype(np.float32) for k, v in tables.items()}


def _respaced(num_steps, betas):
    betas = schedules.dit_betas() if betas is None else np.asarray(betas, np.float64)
    if not 1 <= num_steps <= len(betas):
        raise ValueError(f"num_steps must be in [1, {len(betas)}], got {num_steps}")
    new_betas, tmap = schedules.respace(betas, schedules.space_timesteps(len(betas), [num_steps]))
    ac = schedules.alphas_cumprod(new_betas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    return new_betas, tmap, ac, ac_prev


def ddpm(num_steps: int = 250, betas=None, clip_denoised: bool = False) -> Sampler:
    """DiT/ADM ancestral sampling over ``num_steps`` respaced steps of ``betas`` (default DiT's 1000).

    The min/max log-variances are those of the respaced process: ``log β̃'_k`` (with
    ``β̃'_0`` replaced by ``β̃'_1``, ADM's clipping) and ``log β'_k``.
    """
    new_betas, tmap, ac, ac_prev = _respaced(num_steps, betas)
    post_var = new_betas * (1.0 - ac_prev) / (1.0 - ac)
    min_log = np.log(np.append(post_var[1], post_var[1:]) if len(post_var) > 1 else np.maximum(post_var, 1e-20))
    tables = dict(
        sqrt_recip_ac=np.sqrt(1.0 / ac),
        sqrt_recipm1_ac=np.sqrt(1.0 / ac - 1.0),
        coef_x0=new_betas * np.sqrt(ac_prev) / (1.0 - ac),
        coef_xt=(1.0 - ac_prev) * np.sqrt(1.0 - new_betas) / (1.0 - ac),
        min_log=min_log,
        max_log=np.log(new_betas),
        nonzero=(np.arange(len(new_betas)) > 0).astype(np.float64),
    )
    tables = {k: v[::-1] for k, v in tables.items()}  # step 0 is the noisiest
    return Sampler("ddpm", tmap[::-1].astype(np.float32), _f32(tables), "eps", True, clip_denoised,
                   f"DDPM, {num_steps} respaced steps, learned-range or fixed-small variance")


def ddim(num_steps: int = 50, eta: float = 0.0, betas=None, clip_denoised: bool = False) -> Sampler:
    """DDIM (ADM's ``ddim_sample``) over ``num_steps`` respaced steps; ``eta = 0`` is deterministic."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    _, tmap, ac, ac_prev = _respaced(num_steps, betas)
    sigma = eta * np.sqrt((1.0 - ac_prev) / (1.0 - ac)) * np.sqrt(1.0 - ac / ac_prev)
    nonzero = (np.arange(len(ac)) > 0).astype(np.float64)
    tables = dict(
        sqrt_recip_ac=np.sqrt(1.0 / ac),
        sqrt_recipm1_ac=np.sqrt(1.0 / ac - 1.0),
        coef_x0=np.sqrt(ac_prev),
        coef_eps=np.sqrt(np.maximum(1.0 - ac_prev - sigma**2, 0.0)),
        sigma=sigma * nonzero,
    )
    tables = {k: v[::-1] for k, v in tables.items()}
    return Sampler("ddim", tmap[::-1].astype(np.float32), _f32(tables), "eps", eta > 0, clip_denoised,
                   f"DDIM, {num_steps} respaced steps, eta={eta:g}")


def dpm_solver_pp_2m(num_steps: int = 20, betas=None, clip_denoised: bool = False) -> Sampler:
    """Multistep DPM-Solver++(2M), midpoint form, as diffusers' ``DPMSolverMultistepScheduler``.

    Timesteps are diffusers' ``"linspace"`` spacing; the first step and the last (whose target
    sigma is zero) are first order. With ``σ`` the VP noise level and ``λ = log(α/σ)``:
    ``x_t = (σ_t/σ_s) x - α_t (e^{-h} - 1) (D₀ + ½ D₁)``, ``D₁ = (m₀ - m₁) / r₀``.
    """
    betas = schedules.pixart_sigma_betas() if betas is None else np.asarray(betas, np.float64)
    ac_full = schedules.alphas_cumprod(betas)
    ts = schedules.dpm_solver_timesteps(num_steps, len(betas))
    vp_sigmas = np.sqrt((1.0 - ac_full) / ac_full)
    sig = np.concatenate([np.interp(ts, np.arange(len(vp_sigmas)), vp_sigmas), [0.0]])
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    sigma = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at the final zero sigma
    n = num_steps
    coef_x, coef_d0, coef_d1 = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        h = lam[i + 1] - lam[i]
        exp_mh = 0.0 if np.isinf(h) else np.exp(-h)
        coef_x[i] = sigma[i + 1] / sigma[i]
        coef_d0[i] = -alpha[i + 1] * (exp_mh - 1.0)
        second = i > 0 and i < n - 1  # first order on the first step and the final (zero-sigma) step
        if second:
            r0 = (lam[i] - lam[i - 1]) / h
            coef_d1[i] = 0.5 * coef_d0[i] / r0
    tables = dict(alpha_s=alpha[:-1], sigma_s=sigma[:-1], coef_x=coef_x, coef_d0=coef_d0, coef_d1=coef_d1)
    return Sampler("dpm++2m", ts.astype(np.float32), _f32(tables), "eps", False, clip_denoised,
                   f"DPM-Solver++(2M), {num_steps} steps")


def flow_euler(num_steps: int = 28, shift: float = 3.0, num_train_timesteps: int = 1000) -> Sampler:
    """Euler steps of rectified flow, ``x ← x + (σ_{i+1} - σ_i) v``, model evaluated at ``t = 1000 σ_i``."""
    sig = schedules.flow_sigmas(num_steps, shift, num_train_timesteps)
    tables = dict(sigma=sig[:-1], dt=sig[1:] - sig[:-1])
    return Sampler("euler", (sig[:-1] * num_train_timesteps).astype(np.float32), _f32(tables), "velocity", False, False,
                   f"flow-matching Euler, {num_steps} steps, shift={shift:g}")


def make_sampler(name: str, num_steps: int, *, eta: float = 0.0, shift: float = 3.0, betas=None,
                 clip_denoised: bool = False) -> Sampler:
    """Build a sampler by name (one of :data:`SAMPLERS`)."""
    if name == "ddpm":
        return ddpm(num_steps, betas, clip_denoised)
    if name == "ddim":
        return ddim(num_steps, eta, betas, clip_denoised)
    if name in ("dpm++2m", "dpm-solver++", "dpmpp2m"):
        return dpm_solver_pp_2m(num_steps, betas, clip_denoised)
    if name in ("euler", "flow-euler"):
        return flow_euler(num_steps, shift)
    raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
