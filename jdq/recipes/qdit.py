"""Q-DiT (arXiv 2406.17343; Juanerx/Q-DiT): group-wise GPTQ weights, sample-wise dynamic group activations,
evolutionary search of the group sizes.

``q-dit`` (options, the paper's defaults and their source):

* ``wbits`` / ``abits`` = 4 / 8 (the paper's settings are W4A8 and W6A8; ``scripts/evolution.sh``
  ``--wbits 4 --abits 8 --w_sym --a_sym``): symmetric integers;
* quantized layers: the inputs and weights of ``qkv``, ``proj``, ``fc1`` and ``fc2`` in every
  block (``attn.input_quant``, ``attn.act_quant``, ``mlp.input_quant``, ``mlp.act_quant``); the
  adaLN modulation and the attention matmuls stay in floating point (``--quantize_bmm_input`` off);
* weights: groups of ``g`` input channels with a min-max scale per group and output channel,
  by GPTQ (``gptq`` = ``True``, ``--use_gptq``; damping 0.01, blocks of 128, no act-order, as
  IST-DASLab/gptq's defaults that Q-DiT uses: :func:`jdq.quant.gptq`); the scales are static
  (:func:`static_group_cast`: GPTQ's dequantized weight is on exactly that grid);
  ``gptq=False`` rounds to nearest;
* activations: quantized at every call per token and per group of the layer's ``g`` input
  channels (sample-wise dynamic; the activation group size of a layer equals its weight's);
* group sizes: ``group_size`` = 128 for every layer, or ``group_sizes`` (one per layer, blocks in
  order × (qkv, proj, fc1, fc2)), or ``search=True``: the evolutionary search
  (:func:`jdq.quant.evolution_search`) over ``{32, 64, 128, 192, 288}`` per layer with mean ≥ 128,
  population 50, top 10, 25 mutations (p 0.1), 25 crossovers, seed 1234 (``scripts/evolution.py``),
  ``generations`` (10, ``evolution.sh``). The paper's fitness is FID-800 of generated images; here
  the default fitness is the mean squared error of the denoiser output against the FP model's at
  the calibration points (``fitness="output-mse"``, cheap enough for a CPU), or any callable
  ``fitness(group_sizes) -> float`` (e.g. an Animal-FID of samples, see ``benchmarks/quality.py``);
  the searched sizes are stored in the recipe's options, so a saved model rebuilds its plan;
* calibration: 256 random (step, sample) pairs (``cali_data_256.pth``: 256 points for GPTQ) of
  32 samples, the second moments ``Σ xxᵀ`` of every quantized layer's input.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jdq import formats
from jdq import quant as Q
from jdq.quant.calibrate import CalibrationSettings
from jdq.recipes.core import Recipe, register

LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
GROUP_CHOICES = (32, 64, 128, 192, 288)


@dataclasses.dataclass(frozen=True)
class StaticGroupMeta:
    """``meta`` of a weight cast with static per-group scales (from GPTQ or min-max of the weight)."""

    kind: ClassVar[str] = "static_group"
    fmt: str
    group_size: int


def static_group_cast(bits: int, group_size: int) -> Q.QuantTransform:
    """A weight cast to ``int{bits}`` in groups of ``group_size`` input channels with *static* scales.

    State ``{"scale", "zero"}`` (``jdq.formats.compute_scale``'s shape for ``axis=-2``), set by
    :func:`prepare` from the weight (round to nearest) or from GPTQ; ``casts.cast`` allows static
    scales only per tensor / input channel, so group scales, fixed per weight, live here.
    """
    spec = formats.get(f"int{bits}", granularity="group", group_size=group_size)

    def init(stats):
        return {"scale": None, "zero": None}  # filled by prepare() from the weight itself

    def apply(w, state, ctx):
        if state["scale"] is None:
            return formats.cast(w, spec, axis=ctx.axis)
        return formats.cast(w, spec, axis=ctx.axis, scale=state["scale"], zero=state["zero"])

    return Q.QuantTransform(init, apply, StaticGroupMeta(spec.name, group_size))


def layer_sites(depth: int) -> list[str]:
    """The searched layers in gene order: ``blocks.{i}.{qkv, proj, fc1, fc2}``."""
    return [f"blocks.{i}.{name}" for i in range(depth) for name in LAYERS]


def _sizes(group_size, group_sizes, depth):
    if group_sizes is None:
        return [int(group_size)] * (4 * depth)
    sizes = [int(g) for g in group_sizes]
    if len(sizes) != 4 * depth:
        raise ValueError(f"q-dit: group_sizes has {len(sizes)} entries; this model has {4 * depth} layers "
                         f"({depth} blocks × qkv, proj, fc1, fc2)")
    return sizes


def _rules(wbits=4, abits=8, group_size=128, group_sizes=None, gptq=True, search=False, generations=10,
           population=50, fitness="output-mse", depth=None):
    if depth is None:
        raise ValueError("q-dit needs the model's depth (its layers are listed per block)")
    rules = []
    for site, g in zip(layer_sites(depth), _sizes(group_size, group_sizes, depth)):
        pat = "re:" + site.replace(".", r"\.")
        rules.append(Q.rule(pat, static_group_cast(wbits, g), roles=("weight",), name=f"{site} weight g{g}"))
        rules.append(Q.rule(pat, Q.cast(f"int{abits}", granularity="group", group_size=g),
                            roles=("act", "post_gelu"), name=f"{site} input g{g} (dynamic)"))
    return rules


def _calibration(**_):
    return CalibrationSettings(samples=32, steps="random", pairs=256, stats=("range", "hessian"),
                               roles=("act", "post_gelu"))


def _weights(plan, stats, params, gptq_on, cache=None):
    """``(state, params')``: every static group weight's scales (GPTQ: its weight too, folded into the params)."""
    from jdq.models.base import flatten_params, unflatten_params

    flat = dict(flatten_params(params))
    state = plan.init(stats)
    cache = {} if cache is None else cache
    for key in plan.quantized_keys:
        meta = plan.transform_for(key).meta
        if not isinstance(meta, StaticGroupMeta):
            continue
        site = plan.operand(key).site
        w = jnp.asarray(flat[site + ".kernel"], jnp.float32)
        spec = formats.get(meta.fmt, granularity="group", group_size=meta.group_size)
        ck = (site, meta.fmt, meta.group_size, gptq_on)
        if ck not in cache:
            if gptq_on:
                act = next(o.key for o in plan.operands if o.site == site and o.role in ("act", "post_gelu"))
                if act not in stats or "hessian" not in stats[act]:
                    raise KeyError(f"q-dit: GPTQ needs the input second moments of {site} (calibrate with 'hessian')")
                h = 2.0 * jnp.asarray(stats[act]["hessian"], jnp.float32)
                res = Q.gptq(w, h, f"int{spec.bits}", granularity="group", group_size=meta.group_size)
                cache[ck] = (res.weight, res.scale, res.zero)
            else:
                scale, zero = formats.compute_scale(w, spec, axis=-2)
                cache[ck] = (w, scale, zero)
        wq, scale, zero = cache[ck]
        flat[site + ".kernel"] = wq
        state[key] = {"scale": scale, "zero": zero}
    return state, unflatten_params(flat, params)


def search_group_sizes(model, stats, sampler, cond, *, wbits, abits, gptq=True, generations=10, population=50,
                       fitness="output-mse", seed=1234, points=8, progress=False):
    """Q-DiT's evolutionary search of the per-layer group sizes; returns ``(sizes, EvolutionResult)``."""
    from jdq.recipes.core import model_operands
    from jdq.recipes.tqdit import calibration_points
    from jdq.sampling.generate import Denoiser

    depth = model.config.depth
    operands = model_operands(model, cond)
    fn = Denoiser(model, model.family)
    cache = {}
    if callable(fitness):
        score = fitness
    else:
        if fitness != "output-mse":
            raise ValueError(f"q-dit: fitness must be 'output-mse' or a callable, got {fitness!r}")
        xt, t, c, _ = calibration_points(model, sampler, cond, points, seed=0)
        ref = jax.jit(fn)(model.params, xt, t, c)
        run = jax.jit(lambda p, q: fn(p, xt, t, c, quant=q))

        def score(sizes):
            plan = Q.resolve(_rules(wbits, abits, group_sizes=sizes, depth=depth) + [Q.keep_float("*")], operands)
            state, params = _weights(plan, stats, model.params, gptq, cache)
            return float(jnp.mean((run(params, plan.bind(state)) - ref) ** 2))

    res = Q.evolution_search([GROUP_CHOICES] * (4 * depth), score, constraint=Q.mean_at_least(128),
                             initial=[[128] * (4 * depth)], generations=generations, population=population,
                             top_k=min(10, population), mutations=min(25, population // 2),
                             crossovers=min(25, population // 2), seed=seed, progress=progress)
    return [int(g) for g in res.best], res


def tune(model, stats, sampler, cond, opts):
    """Run the search when asked: the options with the searched ``group_sizes``."""
    if not opts.get("search"):
        return opts
    sizes, _ = search_group_sizes(model, stats, sampler, cond, wbits=opts["wbits"], abits=opts["abits"],
                                  gptq=opts["gptq"], generations=opts["generations"],
                                  population=opts["population"], fitness=opts["fitness"])
    return dict(opts, group_sizes=sizes, search=False)


def prepare(plan, stats, model, *, gptq=True, sampler=None, cond=None, **_):
    """GPTQ (or round-to-nearest) group weights with static scales; the new weights go into the params."""
    return _weights(plan, stats, model.params, gptq)


register(Recipe("q-dit", "Q-DiT: GPTQ group-wise weights, dynamic group activations, evolutionary group sizes",
                _rules, calibrated=True, prepare=prepare, calibration=_calibration, tune=tune,
                options=dict(wbits=4, abits=8, group_size=128, group_sizes=None, gptq=True, search=False,
                             generations=10, population=50, fitness="output-mse", depth=None)))
