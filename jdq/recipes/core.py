"""The recipe registry and the one user flow: recipe → calibrate → init → bind.

A :class:`Recipe` is a name, a one-line description, a function returning its rules (taking the
recipe's keyword options), and how its state is built:

* ``calibrated``: whether its state needs calibration statistics from the floating-point
  sampler (:func:`jdq.sampling.calibrate`, settings from ``calibration(**options)``);
* ``prepare(plan, stats, model, **options) -> (state, params)``: builds the state (and the
  parameters the model runs with, for recipes that re-parameterise weights offline). The
  default is ``(plan.init(stats), model.params)``.

:func:`quantize` runs the whole flow for a model and returns a :class:`Quantized` (the plan, the
bound quantizer and the parameters); ``jdq sample``, ``jdq eval``, ``jdq quantize`` and
``benchmarks/quality.py`` all build their quantizers through it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from jdq import quant as Q

#: The site pattern of the transformer blocks of every family.
BLOCKS = (r"re:(blocks|transformer_blocks|joint_transformer_blocks|single_transformer_blocks"
          r"|encoder\.block|text_model\.encoder\.layers|vision_model\.encoder\.layers)\..*")
LINEAR_ACTS = ("act", "post_gelu")
#: The attention matmul sites of every family (``jdq.models.layers.attention``: ``<attn>.qk`` / ``<attn>.pv``).
ATTENTION_SITES = BLOCKS[:-2] + r".*\.(qk|pv)"


class RecipeError(ValueError):
    """A recipe that does not exist, does not fit the model, or got a bad option."""


def _default_prepare(plan, stats, model, **options):
    return plan.init(stats), model.params


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named plan: ``rules(**options)`` builds its rules; ``calibrated`` recipes need operand statistics.

    ``options``: the keyword options and their defaults (the paper's setting); ``version``: bumped
    when the state a recipe builds changes meaning (a saved quantized folder of another version is
    refused); ``calibration(**options)``: the calibration settings
    (:class:`jdq.quant.calibrate.CalibrationSettings`) of a calibrated recipe;
    ``tune(model, stats, sampler, cond, options) -> options``: a search run after calibration that
    fixes options the plan depends on (Q-DiT's group sizes).
    """

    name: str
    description: str
    rules: Callable[..., Sequence[Q.Rule]]
    calibrated: bool = False
    prepare: Callable[..., tuple[Any, Any]] = _default_prepare
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    calibration: Callable[..., Any] | None = None
    tune: Callable[..., Any] | None = None
    version: int = 1

    def resolve_options(self, **options) -> dict[str, Any]:
        """The recipe's defaults updated by ``options``; an unknown option is a :class:`RecipeError`."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise RecipeError(f"recipe {self.name!r} has no option {unknown[0]!r}; its options: {known}")
        return {**self.options, **options}


_REGISTRY: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add ``recipe`` to the registry (a name may be registered once)."""
    if recipe.name in _REGISTRY:
        raise ValueError(f"a recipe named {recipe.name!r} is already registered")
    _REGISTRY[recipe.name] = recipe
    return recipe


def names() -> tuple[str, ...]:
    """Names of the registered recipes."""
    return tuple(_REGISTRY)


def get(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name raises :class:`RecipeError` listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown quantization recipe {name!r}; known: {', '.join(names())}") from None


def plan_for(name: str, operands: Sequence[Q.Operand], **options) -> Q.Plan:
    """Resolve recipe ``name`` (with ``options``) against a model's operands; a recipe that quantizes nothing is an error."""
    recipe = get(name)
    opts = recipe.resolve_options(**options)
    plan = Q.resolve(list(recipe.rules(**opts)) + [Q.keep_float("*", name="everything else")], operands)
    if not plan.quantized_keys:
        raise RecipeError(f"recipe {name!r} does not fit this model: none of its {len(operands)} matmul operands "
                          f"matches the recipe's rules (expected transformer blocks named like 'blocks.0.attn.qkv')")
    return plan


class Quantized(NamedTuple):
    """A ready quantized model: the plan, its bound quantizer, the parameters to run with, and a record.

    ``params`` are the model's own unless the recipe re-parameterises weights offline (folded
    balancing); pass them to :func:`jdq.sampling.generate` (``params=``) with ``quant=quantizer``.
    ``info``: the recipe, its options, the calibration settings and timings (for reports).
    """

    plan: Q.Plan
    quantizer: Q.Quantizer
    params: Any
    info: Mapping[str, Any]


def model_operands(model, cond):
    """The matmul operands of ``model`` for one sample of ``cond`` (traced abstractly)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdq.sampling.generate import Denoiser, sample_shape

    fn = Denoiser(model, model.family)
    take = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[:1]), cond)
    x = jnp.zeros((1,) + sample_shape(model), jnp.float32)
    return Q.trace_operands(fn, model.params, x, jnp.zeros((1,), jnp.float32), take)


def calibration_stats(model, sampler, cond, *, uncond=None, guidance: float = 1.0, seed: int = 0,
                      settings=None, path=None, progress: bool = False):
    """Statistics of every operand of ``model`` along the FP sampler's trajectories of ``cond``.

    ``settings``: a :class:`jdq.quant.calibrate.CalibrationSettings` (``None``: every step, the
    conditions in ``cond``, guidance halves together). Sample ``j`` of the calibration set uses
    the key ``fold_in(key(seed + 1), j)``.
    """
    from jdq.quant.calibrate import CalibrationSettings
    from jdq.sampling.calibrate import calibrate
    from jdq.sampling.generate import Denoiser, guided_channels, null_condition, sample_shape

    settings = settings or CalibrationSettings()
    unc = uncond
    if guidance != 1.0 and unc is None:
        unc = null_condition(model, cond)
    return calibrate(Denoiser(model, model.family), model.params, sampler, cond, sample_shape(model), settings,
                     uncond=unc if guidance != 1.0 else None, guidance=guidance,
                     guided_channels=guided_channels(model), seed=seed + 1, path=path, progress=progress)


def quantize(model, name: str, *, sampler=None, cond=None, uncond=None, guidance: float = 1.0, seed: int = 0,
             calib_samples: int | None = None, stats=None, stats_path=None, progress: bool = False,
             **options) -> Quantized:
    """Recipe ``name`` for ``model``: resolve, calibrate (if the recipe needs it), init, bind.

    ``cond``: the calibration conditions (the first ``calib_samples`` are used; default the
    recipe's calibration size); ``sampler`` / ``guidance`` / ``uncond``: the trajectory the
    statistics are taken along; ``stats``: precomputed statistics (skips calibration);
    ``stats_path``: a safetensors file the calibration saves to and resumes from.
    ``options``: the recipe's keyword options.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    recipe = get(name)
    if "steps" in recipe.options and options.get("steps") is None and sampler is not None:
        options = dict(options, steps=sampler.num_steps)  # recipes whose plan follows the sampler (time groups)
    if "depth" in recipe.options and options.get("depth") is None:
        options = dict(options, depth=int(model.config.depth))  # recipes listing layers per block
    opts = recipe.resolve_options(**options)
    if cond is None:
        raise RecipeError("quantize: give the conditions (cond) the operands are traced with")
    operands = model_operands(model, cond)
    plan_for(name, operands, **opts)  # a recipe that does not fit fails before calibrating
    info: dict[str, Any] = {"recipe": name, "version": recipe.version, "options": opts, "calibration": None,
                            "calibration_s": 0.0}
    if recipe.calibrated and stats is None:
        from jdq.quant.calibrate import CalibrationSettings

        if sampler is None:
            raise RecipeError(f"recipe {name!r} needs calibration: give the sampler to calibrate along")
        settings = recipe.calibration(**opts) if recipe.calibration is not None else CalibrationSettings()
        available = int(np.shape(jax.tree.leaves(cond)[0])[0])
        n = calib_samples if calib_samples is not None else (settings.samples or available)
        n = max(1, min(n, available))
        settings = dataclasses.replace(settings, samples=n)
        if settings.steps == "random":  # at most every (step, sample) pair of a small calibration set
            settings = dataclasses.replace(settings, pairs=min(settings.pairs, n * sampler.num_steps))
        calib = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[:n]), cond)
        t0 = time.perf_counter()
        stats = calibration_stats(model, sampler, calib, uncond=uncond, guidance=guidance, seed=seed,
                                  settings=settings, path=stats_path, progress=progress)
        info["calibration_s"] = time.perf_counter() - t0
        info["calibration"] = dict(settings.to_dict(), sampler=sampler.kind, sampler_steps=sampler.num_steps,
                                   guidance=float(guidance), seed=seed + 1)
    t0 = time.perf_counter()
    if recipe.tune is not None:
        opts = recipe.tune(model, stats, sampler, cond, opts)
        info["options"] = opts
    plan = plan_for(name, operands, **opts)
    extra = {"sampler": sampler, "cond": cond} if recipe.prepare is not _default_prepare else {}
    state, params = recipe.prepare(plan, stats, model, **opts, **extra)
    info["prepare_s"] = time.perf_counter() - t0
    return Quantized(plan, plan.bind(state), params, info)


def encoder_quantizers(pipeline, name: str) -> list:
    """Quantizers of recipe ``name`` for each text encoder of ``pipeline`` (assign to its ``encoder_quant``).

    The recipe's rules cover the encoders' blocks (``encoder.block.*``, ``text_model.encoder.layers.*``);
    recipes that need calibration statistics are refused (the encoders are not calibrated).
    """
    import jax.numpy as jnp

    if get(name).calibrated:
        raise RecipeError(f"recipe {name!r} needs calibration statistics; the text encoders take "
                          f"uncalibrated recipes (e.g. w8a8, w4a8, an MX format)")
    out = []
    for enc, n in zip(pipeline.encoders, pipeline.token_lengths()):
        ops = Q.trace_operands(lambda p, ids, quant, enc=enc: enc.apply(p, ids, quant=quant), enc.params,
                               jnp.zeros((1, n), jnp.int32))
        plan = plan_for(name, ops)
        out.append(plan.bind(plan.init(None)))
    return out
