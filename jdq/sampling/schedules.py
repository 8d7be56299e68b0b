"""Noise schedules: the training schedules of DiT, PixArt-Σ and SD3 and how samplers space them.

Everything here is host-side numpy in float64 (schedules are computed once, then handed to the
compiled sampler as float32 tables).

* DiT / ADM: 1000 linear betas (``beta_start = 1e-4``, ``beta_end = 0.02``, scaled by
  ``1000 / T``), respaced with :func:`space_timesteps` as facebookresearch/DiT's
  ``create_diffusion(str(N))`` does. A respaced process has its own betas
  (:func:`respace`): ``beta'_k = 1 - ᾱ(t_k) / ᾱ(t_{k-1})``.
* PixArt-Σ: the same 1000 linear betas; its DPM-Solver samples at diffusers'
  ``timestep_spacing="linspace"`` points (:func:`dpm_solver_timesteps`).
* SD3: rectified flow, ``x_σ = (1 - σ) x₀ + σ ε``, with the shift
  ``σ' = s σ / (1 + (s - 1) σ)`` (``s = 3`` for SD3), as diffusers'
  ``FlowMatchEulerDiscreteScheduler`` (:func:`flow_sigmas`).
"""

from __future__ import annotations

import numpy as np


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """``num_timesteps`` betas evenly spaced from ``beta_start`` to ``beta_end`` (float64)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def dit_betas(num_timesteps: int = 1000) -> np.ndarray:
    """DiT/ADM's ``"linear"`` schedule: linear betas from ``1e-4`` to ``0.02``, scaled by ``1000 / T``."""
    scale = 1000.0 / num_timesteps
    return linear_betas(num_timesteps, scale * 1e-4, scale * 0.02)


def pixart_sigma_betas() -> np.ndarray:
    """PixArt-Σ's training schedule: 1000 linear betas from ``1e-4`` to ``0.02``."""
    return linear_betas(1000, 1e-4, 0.02)


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """``ᾱ_t = ∏_{s ≤ t} (1 - β_s)``."""
    return np.cumprod(1.0 - np.asarray(betas, np.float64))


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """The timesteps DiT/ADM keep when respacing ``num_timesteps`` into ``section_counts`` steps.

    ``section_counts`` is an int, a list of ints (steps per equal section of the original
    process), a comma-separated string of them, or ``"ddimN"`` (the DDIM paper's integer
    stride). Returns the kept timesteps in increasing order. Within a section of ``size`` steps
    taken ``count`` times, step ``j`` is ``round(j * (size - 1) / (count - 1))`` with Python's
    round-half-to-even, accumulated in floating point exactly as the reference does.
    """
    if isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} steps of {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    section_counts = [int(c) for c in section_counts]
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"section counts must be positive integers, got {section_counts}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def respace(betas: np.ndarray, use_timesteps) -> tuple[np.ndarray, np.ndarray]:
    """The betas of the process that keeps only ``use_timesteps``, and the kept original timesteps.

    ``β'_k = 1 - ᾱ(t_k) / ᾱ(t_{k-1})`` (with ``ᾱ(t_{-1}) = 1``), so the respaced process has the
    same ``ᾱ`` at the kept timesteps. Returns ``(new_betas, timestep_map)``, both ordered by
    increasing time; the model is evaluated at ``timestep_map[k]``.
    """
    keep = np.asarray(sorted(set(int(t) for t in use_timesteps)), np.int64)
    if keep.size == 0 or keep[0] < 0 or keep[-1] >= len(betas):
        raise ValueError(f"timesteps to keep must lie in [0, {len(betas)}), got {keep.tolist()[:5]}…")
    ac = alphas_cumprod(betas)[keep]
    prev = np.concatenate([[1.0], ac[:-1]])
    return 1.0 - ac / prev, keep


def dpm_solver_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """diffusers' ``timestep_spacing="linspace"`` points of DPM-Solver, decreasing (int64)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    return np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The flow-matching time shift ``σ' = s σ / (1 + (s - 1) σ)`` (SD3: ``s = 3``)."""
    sigmas = np.asarray(sigmas, np.float64)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> np.ndarray:
    """The ``num_steps + 1`` sigmas of flow-matching Euler sampling, ending with ``0``.

    As diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps``: evenly spaced from 1 to the
    shifted training ``σ_min = shift(1 / T)``, shifted again, then a terminal ``0``. The model is
    evaluated at ``t = 1000 σ``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigma_min = shift_sigmas(np.array(1.0 / num_train_timesteps), shift)
    sigmas = np.linspace(1.0, float(sigma_min), num_steps)
    return np.concatenate([shift_sigmas(sigmas, shift), [0.0]])
