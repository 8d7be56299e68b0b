"""Round-to-nearest integer baselines: the naive W8A8 / W6A6 / W4A8 the DiT papers compare with, and FP16.

* ``w8a8`` — int8 symmetric weights per output channel, int8 symmetric activations per token
  (dynamic); attention matmuls in floating point (the naive W8A8 baseline).
* ``w8a8-static`` — as ``w8a8`` but activations with one static per-tensor scale from
  calibration (max over steps); needs calibration.
* ``w8a8-fp8attn`` — ``w8a8`` plus both attention matmuls in FP8 E4M3 (:func:`fp8_attention_rules`:
  q and k per token with k centred over tokens first, probabilities per query row, v per channel).
* ``w4a8`` — int4 weights in groups of 64 input channels, int8 per-token activations.
* ``w6a6`` — int6 weights per output channel, int6 activations per token (the naive W6A6 of TQ-DiT).
* ``fp16`` — every matmul operand in the blocks rounded to IEEE float16 (the papers' FP rows are
  FP16/FP32; on the embedded model this shows what half precision alone costs).
"""

from __future__ import annotations

from jdq import quant as Q
from jdq.recipes.core import ATTENTION_SITES, BLOCKS, LINEAR_ACTS, Recipe, register


def _w8a8(static: bool):
    act = Q.cast("int8", granularity="tensor", static=True) if static else Q.cast("int8", granularity="row")
    return lambda: [Q.rule(BLOCKS, Q.cast("int8", granularity="row"), roles=("weight",), name="int8 weights"),
                    Q.rule(BLOCKS, act, roles=LINEAR_ACTS, name="int8 activations")]


def _w4a8():
    return [Q.rule(BLOCKS, Q.cast("int4", granularity="group", group_size=64), roles=("weight",), name="int4 weights"),
            Q.rule(BLOCKS, Q.cast("int8", granularity="row"), roles=LINEAR_ACTS, name="int8 activations")]


def _w6a6():
    return [Q.rule(BLOCKS, Q.cast("int6", granularity="row"), roles=("weight",), name="int6 weights"),
            Q.rule(BLOCKS, Q.cast("int6", granularity="row"), roles=LINEAR_ACTS, name="int6 activations")]


def _fp16():
    half = Q.stateless(lambda x, ctx: x.astype("float16").astype(x.dtype))
    return [Q.rule(BLOCKS, half, name="float16 operands")]


def fp8_attention_rules():
    """FP8 E4M3 attention operands (SageAttention-style): q per token, k centred over tokens then per token,
    the probabilities per query row, v per channel — all scales along the tokens / channels a kernel
    applies outside its MMAs (:func:`jdq.quant.center_tokens`)."""
    e4m3 = Q.cast("fp8_e4m3", granularity="row")
    return [Q.rule(ATTENTION_SITES, e4m3, roles=("q",), name="q: E4M3 per token"),
            Q.rule(ATTENTION_SITES, Q.chain(Q.center_tokens(), e4m3), roles=("k",),
                   name="k: centred over tokens, E4M3 per token"),
            Q.rule(ATTENTION_SITES, e4m3, roles=("attn_prob", "v"), name="p: E4M3 per query row; v: per channel")]


register(Recipe("w8a8", "int8 weights (per output channel) and activations (per token, dynamic)", _w8a8(False)))
register(Recipe("w8a8-static", "int8 weights (per output channel), int8 activations (per tensor, calibrated)",
                _w8a8(True), calibrated=True))
register(Recipe("w8a8-fp8attn", "w8a8, and attention q·kᵀ / p·v in FP8 E4M3 with k centred over tokens (SageAttention-style)",
                lambda: list(_w8a8(False)()) + fp8_attention_rules()))
register(Recipe("w4a8", "int4 weights (groups of 64), int8 activations (per token, dynamic)", _w4a8))
register(Recipe("w6a6", "int6 weights (per output channel) and activations (per token, dynamic): naive W6A6", _w6a6))
register(Recipe("fp16", "every matmul operand in the blocks rounded to float16", _fp16))
