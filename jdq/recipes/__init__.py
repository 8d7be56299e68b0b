"""Named quantization plans (``jdq sample --quant NAME``): rules built from :mod:`jdq.quant` transforms.

A :class:`Recipe` is a name, a one-line description, a function returning its rules, and whether
its state needs calibration statistics (then :func:`quantizer` runs the floating-point sampler
and collects per-step operand statistics first, :func:`jdq.sampling.collect_sampler_stats`).

Which operands a recipe quantizes: the matmuls inside the transformer blocks of every family
(``blocks.*`` in DiT, ``transformer_blocks.*`` in PixArt-Σ and SD3, ``joint_transformer_blocks.*``
/ ``single_transformer_blocks.*`` where present; the layers of the text encoders, ``encoder.block.*``
in T5 and ``text_model.encoder.layers.*`` / ``vision_model.encoder.layers.*`` in CLIP); the embedders, the adaLN-single / time MLPs
outside the blocks and the final layer stay in floating point (the common skip list of ViDiT-Q,
Q-DiT and PTQ4DiT). Weights are cast along their contraction (input) axis, so an integer
weight's ``"row"`` scale is per output channel.

Built-in recipes (:func:`names`):

* ``w8a8`` — int8 symmetric weights per output channel, int8 symmetric activations per token
  (dynamic); attention matmuls in floating point (the naive W8A8 baseline).
* ``w8a8-static`` — as ``w8a8`` but activations with one static per-tensor scale from
  calibration (max over steps); needs calibration.
* ``w8a8-fp8attn`` — ``w8a8`` plus both attention matmuls in FP8 E4M3 (:func:`fp8_attention_rules`:
  q and k per token with k centred over tokens first, probabilities per query row, v per channel).
* ``w4a8`` — int4 weights in groups of 64 input channels, int8 per-token activations.
* ``<mx format>`` for each OCP MX and shared-microexponent format (``mxfp8_e4m3``,
  ``mxfp8_e5m2``, ``mxfp6_e3m2``, ``mxfp6_e2m3``, ``mxfp4_e2m1``, ``mxint8``, ``mx9``, ``mx6``,
  ``mx4``): every matmul operand in the blocks, weights and activations, attention included,
  in that format (block scales along the contraction axis).
* ``mixdit`` — MixDiT-style: activations split by magnitude, the top 5 % of blocks (linear
  layers) / 20 % (attention operands) in MX9 and the rest in MX6; weights in MX6.

Other modules may add recipes with :func:`register`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from jdq import quant as Q

#: The site pattern of the transformer blocks of every family.
BLOCKS = (r"re:(blocks|transformer_blocks|joint_transformer_blocks|single_transformer_blocks"
          r"|encoder\.block|text_model\.encoder\.layers|vision_model\.encoder\.layers)\..*")
LINEAR_ACTS = ("act", "post_gelu")
MX_FORMATS = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8", "mx9", "mx6", "mx4")


class RecipeError(ValueError):
    """A recipe that does not exist or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named plan: ``rules()`` builds its rules; ``calibrated`` recipes need operand statistics."""

    name: str
    description: str
    rules: Callable[[], Sequence[Q.Rule]]
    calibrated: bool = False


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


def plan_for(name: str, operands: Sequence[Q.Operand]) -> Q.Plan:
    """Resolve recipe ``name`` against a model's operands; a recipe that quantizes nothing is an error."""
    recipe = get(name)
    plan = Q.resolve(list(recipe.rules()) + [Q.keep_float("*", name="everything else")], operands)
    if not plan.quantized_keys:
        raise RecipeError(f"recipe {name!r} does not fit this model: none of its {len(operands)} matmul operands "
                          f"matches the recipe's rules (expected transformer blocks named like 'blocks.0.attn.qkv')")
    return plan


def _w8a8(static: bool):
    act = Q.cast("int8", granularity="tensor", static=True) if static else Q.cast("int8", granularity="row")
    return lambda: [Q.rule(BLOCKS, Q.cast("int8", granularity="row"), roles=("weight",), name="int8 weights"),
                    Q.rule(BLOCKS, act, roles=LINEAR_ACTS, name="int8 activations")]


def _w4a8():
    return [Q.rule(BLOCKS, Q.cast("int4", granularity="group", group_size=64), roles=("weight",), name="int4 weights"),
            Q.rule(BLOCKS, Q.cast("int8", granularity="row"), roles=LINEAR_ACTS, name="int8 activations")]


def _mx(fmt: str):
    return lambda: [Q.rule(BLOCKS, Q.cast(fmt), name=f"{fmt} operands")]


#: The attention matmul sites of every family (``jdq.models.layers.attention``: ``<attn>.qk`` / ``<attn>.pv``).
ATTENTION_SITES = BLOCKS[:-2] + r".*\.(qk|pv)"


def fp8_attention_rules():
    """FP8 E4M3 attention operands (SageAttention-style): q per token, k centred over tokens then per token,
    the probabilities per query row, v per channel — all scales along the tokens / channels a kernel
    applies outside its MMAs (:func:`jdq.quant.center_tokens`)."""
    e4m3 = Q.cast("fp8_e4m3", granularity="row")
    return [Q.rule(ATTENTION_SITES, e4m3, roles=("q",), name="q: E4M3 per token"),
            Q.rule(ATTENTION_SITES, Q.chain(Q.center_tokens(), e4m3), roles=("k",),
                   name="k: centred over tokens, E4M3 per token"),
            Q.rule(ATTENTION_SITES, e4m3, roles=("attn_prob", "v"), name="p: E4M3 per query row; v: per channel")]


def _mixdit(linear_ratio: float = 0.05, attn_ratio: float = 0.20):
    def rules():
        return [
            Q.rule(BLOCKS, Q.cast("mx6"), roles=("weight",), name="mx6 weights"),
            Q.rule(BLOCKS, Q.outlier_split(linear_ratio, hi="mx9", lo="mx6"), roles=LINEAR_ACTS,
                   name=f"linear activations: top {linear_ratio:.0%} blocks mx9, rest mx6"),
            Q.rule(BLOCKS, Q.outlier_split(attn_ratio, hi="mx9", lo="mx6"), roles=Q.ATTENTION_ROLES,
                   name=f"attention operands: top {attn_ratio:.0%} blocks mx9, rest mx6"),
        ]
    return rules


register(Recipe("w8a8", "int8 weights (per output channel) and activations (per token, dynamic)", _w8a8(False)))
register(Recipe("w8a8-static", "int8 weights (per output channel), int8 activations (per tensor, calibrated)",
                _w8a8(True), calibrated=True))
register(Recipe("w8a8-fp8attn", "w8a8, and attention q·kᵀ / p·v in FP8 E4M3 with k centred over tokens (SageAttention-style)",
                lambda: list(_w8a8(False)()) + fp8_attention_rules()))
register(Recipe("w4a8", "int4 weights (groups of 64), int8 activations (per token, dynamic)", _w4a8))
for _fmt in MX_FORMATS:
    register(Recipe(_fmt, f"every matmul operand in the blocks in {_fmt}", _mx(_fmt)))
register(Recipe("mixdit", "MixDiT: activation outliers (5% linear, 20% attention) in mx9, the rest and weights in mx6",
                _mixdit()))
