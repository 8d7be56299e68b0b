"""What a denoiser family carries with it: how to call it, what it samples, its defaults and named configs.

Each denoiser family module (``jdq.models.dit``, ``pixart``, ``mmdit``) defines ``SPEC``, a
:class:`FamilySpec`; :func:`spec_of` finds it for a model, a config or a family name. Sampling
(:mod:`jdq.sampling.generate`), the command line and the cost model (:mod:`jdq.hw.workload`) read
a family's conventions from its spec and nowhere else, so a new family is its module (with a
``SPEC``) plus its line in :data:`jdq.models.base.FAMILIES`.

Named configs (:func:`named_config`): the published models a cost estimate or a benchmark names,
``dit-xl-2`` (DiT-XL/2 at 256 px), ``pixart-sigma`` (PixArt-Σ-XL/2 at 1024 px), ``sd3-medium``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jdq.models.base import FAMILIES, family_module, family_of


@dataclasses.dataclass(frozen=True)
class NamedConfig:
    """A published model: its config (built on demand), a usual number of sampling steps, one line about it."""

    family: str
    config: Callable[[], Any]
    steps: int
    description: str


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """A denoiser family's conventions (see the module docstring).

    * ``denoise(model, params, x, t, cond, quant)``: the model's prediction for latents ``x``
      (B, H, W, C) at timesteps ``t`` (B,) under condition ``cond`` (class labels, or a dict of
      text arrays);
    * ``sample_shape(config)``: the per-sample ``(H, W, C)`` it denoises;
    * ``defaults``: ``sampler``, ``steps``, ``guidance`` (and ``shift`` for flow matching);
    * ``flow``: whether it predicts a flow-matching velocity (else noise);
    * ``guided_channels(config)``: how many leading output channels guidance acts on (``None``: all);
    * ``null_condition(config)``: the unconditional input for guidance, or ``None`` when the user
      must give it (negative text embeddings);
    * ``text_keys``: ``(required, optional)`` arrays of a text condition; ``None``: class labels;
    * ``abstract_inputs(config, batch)``: ``jax.ShapeDtypeStruct`` inputs for tracing one call;
    * ``configs``: named configs of this family (:class:`NamedConfig`).
    """

    name: str
    denoise: Callable[..., Any]
    sample_shape: Callable[[Any], tuple[int, int, int]]
    defaults: Mapping[str, Any]
    abstract_inputs: Callable[[Any, int], tuple]
    flow: bool = False
    guided_channels: Callable[[Any], int | None] = lambda config: None
    null_condition: Callable[[Any], Any] | None = None
    text_keys: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    configs: Mapping[str, NamedConfig] = dataclasses.field(default_factory=dict)

    @property
    def class_conditional(self) -> bool:
        """Whether the family is conditioned on class labels (else on text embeddings)."""
        return self.text_keys is None


def abstract_array(shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    """A ``jax.ShapeDtypeStruct`` (a family's abstract inputs are built from these)."""
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def find_spec(thing) -> FamilySpec | None:
    """The :class:`FamilySpec` of a model, a config or a family name; ``None`` for a family that is no denoiser."""
    if isinstance(thing, str):
        family = thing
    elif hasattr(thing, "config") and hasattr(thing, "graphdef"):
        family = thing.family
    else:
        family = family_of(thing)
    return getattr(family_module(family), "SPEC", None)


def spec_of(thing) -> FamilySpec:
    """The :class:`FamilySpec` of a model, a config or a family name; a family that is no denoiser is an error."""
    spec = find_spec(thing)
    if spec is None:
        family = thing if isinstance(thing, str) else (thing.family if hasattr(thing, "graphdef") else family_of(thing))
        raise ValueError(f"a {family} model is not a denoiser: it cannot be sampled (give a DiT, PixArt-Σ or SD3 model)")
    return spec


def denoiser_families() -> tuple[str, ...]:
    """Names of the families that have a :class:`FamilySpec` (the ones jdq samples)."""
    return tuple(f for f in FAMILIES if find_spec(f) is not None)


def named_configs() -> dict[str, NamedConfig]:
    """``{name: NamedConfig}`` of every denoiser family's published models."""
    return {name: nc for f in denoiser_families() for name, nc in spec_of(f).configs.items()}


def named_config(name: str) -> NamedConfig:
    """The named config ``name`` (e.g. ``"dit-xl-2"``); an unknown name is a ``KeyError`` listing the known ones."""
    known = named_configs()
    if name not in known:
        raise KeyError(f"unknown model {name!r}; known models: {sorted(known)}")
    return known[name]
