"""PTQ4DiT (arXiv 2405.16005; adreamwu/PTQ4DiT): channel-wise salience balancing with Spearman-ρ salience calibration.

``ptq4dit`` (options, the paper's defaults and their source):

* ``wbits`` / ``abits`` = 8 / 8 (the paper's settings are W8A8 and W4A8): weights per output
  channel (round to nearest; the released code adds BRECQ / AdaRound reconstruction, left out
  here), activations one static asymmetric range per tensor (the Q-Diffusion-style activation
  quantizers the code uses; their momentum range, an average of per-batch ranges, is taken as the
  mean of the per-step ranges: ``reduce="mean"``), the attention operands (q, k, v and the
  softmax output, ``--sm_abit 8``) too;
* ``balance`` = ``True``: CSB + SSC at the inputs of ``qkv``, ``proj`` and ``fc1``, as the released
  ``models.py`` computes them (:class:`jdq.quant.ChannelBalance` with ``alpha=0.5``,
  ``salience="ssc"``: ``s_j = sqrt(ā_j / w_j)`` with ``ā`` the softmax(−ρ)-weighted per-sample
  salience, streamed by the calibration); ``fc2`` is not balanced (as the code). ``False`` gives
  the same quantizers without balancing (the round-to-nearest baseline at the same settings);
* ``fold`` = ``True``: the paper's offline re-parameterisation: ``W·s`` folded into the weights,
  and ``1/s`` of ``qkv`` and ``fc1`` folded into the adaLN modulation that produces their inputs'
  shift and scale (:func:`jdq.quant.fold_into_modulation`), so neither divides at run time. ``proj``'s
  input (the attention output) has no preceding affine op in jdq's DiT, so its division stays at
  run time (the paper folds it into V's projection; the released code divides online everywhere);
* calibration: 32 samples (the issue's reading of the paper; the README's 256² W8A8 run uses
  ``--cali_n 64``) at 25 steps evenly spread over the trajectory (``--cali_st 25``; all steps when
  the sampler has fewer), guidance halves together, statistics ``range`` + ``ssc``.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from jdq import quant as Q
from jdq.quant.calibrate import CalibrationSettings
from jdq.recipes.core import ATTENTION_SITES, BLOCKS, Recipe, register

#: Sites whose input PTQ4DiT balances; the first two are folded into the adaLN modulation.
BALANCED = r"re:.*\.(attn\.qkv|attn\.proj|mlp\.fc1)"
FOLDED = ("attn.qkv", "mlp.fc1")
#: Which adaLN chunks (of 6: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) feed a folded site.
MODULATION_CHUNKS = {"attn.qkv": (0, 1), "mlp.fc1": (3, 4)}


def _rules(wbits=8, abits=8, balance=True, fold=True):
    w = Q.cast(f"int{wbits}", granularity="row")
    a = Q.cast(f"int{abits}", granularity="tensor", static=True, symmetric=False, reduce="mean")
    rules = []
    if balance:
        bal = Q.ChannelBalance(alpha=0.5, salience="ssc")
        rules += [Q.rule(BALANCED, bal.weight(w), roles=("weight",), name="balanced weights (W·s)"),
                  Q.rule(BALANCED, bal.act(a), roles=("act",), name="balanced inputs (x / s)")]
    rules += [Q.rule(BLOCKS, w, roles=("weight",), name=f"int{wbits} weights per output channel"),
              Q.rule(BLOCKS, a, roles=("act", "post_gelu"), name=f"int{abits} inputs per tensor (static)"),
              Q.rule(ATTENTION_SITES, a, roles=("q", "k", "v", "attn_prob"), name=f"int{abits} attention operands")]
    return rules


def _calibration(**_):
    return CalibrationSettings(samples=32, steps="uniform", num_steps=25, stats=("range", "ssc"))


def fold(plan, state, params):
    """PTQ4DiT's re-parameterisation: ``(state', params')`` with ``W·s`` and the qkv / fc1 ``1/s`` folded offline."""
    from jdq.models.base import flatten_params, unflatten_params

    flat = dict(flatten_params(params))
    weights = {o.site: flat[o.site + ".kernel"] for o in plan.operands
               if o.role == "weight" and o.site + ".kernel" in flat and plan.transform_for(o.key) is not None}
    new_w, state = Q.fold_balance(plan, state, weights)
    for site, w in new_w.items():
        flat[site + ".kernel"] = w
    sites = [o.site for o in plan.operands if o.role == "act" and o.site.endswith(FOLDED)]
    scales, state = Q.pop_act_scales(plan, state, sites=sites)
    for site, s in scales.items():
        m = re.fullmatch(r"(.*)\.(attn\.qkv|mlp\.fc1)", site)
        block, which = m.group(1), m.group(2)
        k, b = flat[f"{block}.adaLN_modulation.kernel"], flat[f"{block}.adaLN_modulation.bias"]
        c = k.shape[-1] // 6
        i_shift, i_scale = MODULATION_CHUNKS[which]
        cols = lambda i: slice(i * c, (i + 1) * c)  # noqa: E731
        ws, bs, wc, bc = Q.fold_into_modulation(k[:, cols(i_shift)], b[cols(i_shift)], k[:, cols(i_scale)],
                                                b[cols(i_scale)], s)
        # folded in float32, stored in the model's own dtype (a bf16 model stays bf16)
        k = k.at[:, cols(i_shift)].set(ws.astype(k.dtype)).at[:, cols(i_scale)].set(wc.astype(k.dtype))
        b = b.at[cols(i_shift)].set(bs.astype(b.dtype)).at[cols(i_scale)].set(bc.astype(b.dtype))
        flat[f"{block}.adaLN_modulation.kernel"], flat[f"{block}.adaLN_modulation.bias"] = k, b
    return state, unflatten_params(flat, params)


def prepare(plan, stats, model, *, wbits=8, abits=8, balance=True, fold=True, sampler=None, cond=None):
    """Linked statistics → state (CSB + SSC), then the offline folding."""
    state = plan.init(Q.link_stats(stats))
    if balance and fold:
        return globals()["fold"](plan, state, model.params)
    return state, model.params


register(Recipe("ptq4dit", "PTQ4DiT: CSB + SSC balancing folded into the weights and adaLN; static per-tensor inputs",
                _rules, calibrated=True, prepare=prepare, calibration=_calibration,
                options=dict(wbits=8, abits=8, balance=True, fold=True)))
