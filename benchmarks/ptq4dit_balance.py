"""PTQ4DiT's balancing on the embedded model: one-step output error of weight-only, activation-only and both.

``python benchmarks/ptq4dit_balance.py`` (CPU, ~1 CPU-minute): calibrates as the ``ptq4dit`` recipe
(32 samples, DDIM 10, guidance 1.5), then measures the denoiser output's relative error against FP
at 16 calibration points for int4 / int8 per-channel weights and int8 per-tensor static inputs,
with and without CSB + SSC, and how far the factors stretch the weights' per-column ranges.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np, jax, jax.numpy as jnp  # noqa: E401,E402
from jdq import quant as Q, recipes
from jdq.recipes import ptq4dit, tqdit
from jdq.recipes.core import ATTENTION_SITES, BLOCKS, model_operands
from jdq.cli.sample import _resolve_model
from jdq.sampling.generate import resolve_sampler, Denoiser
_, m, d = _resolve_model(None)
s = resolve_sampler(m, "ddim", 10, clip_denoised=True)
labels = (np.arange(32) % 10).astype(np.int32)
stats = recipes.calibration_stats(m, s, labels, guidance=1.5, settings=ptq4dit._calibration())
stats = Q.link_stats(stats)
ops = model_operands(m, labels)
fn = Denoiser(m, m.family)
xt, t, c, _ = tqdit.calibration_points(m, s, labels, 16, 0)
ref = fn(m.params, xt, t, c)
def rules(wbits, balance, wq, aq):
    w = Q.cast(f"int{wbits}", granularity="row") if wq else Q.identity()
    a = Q.cast("int8", granularity="tensor", static=True, symmetric=False, reduce="mean") if aq else Q.identity()
    r = []
    if balance:
        bal = Q.ChannelBalance(alpha=0.5, salience="ssc")
        r += [Q.rule(ptq4dit.BALANCED, bal.weight(w), roles=("weight",)), Q.rule(ptq4dit.BALANCED, bal.act(a), roles=("act",))]
    r += [Q.rule(BLOCKS, w, roles=("weight",)), Q.rule(BLOCKS, a, roles=("act", "post_gelu")),
          Q.rule(ATTENTION_SITES, a, roles=("q", "k", "v", "attn_prob")), Q.keep_float("*")]
    return r
print("| weights | activations | balanced | output rel. error |")
print("|---|---|---|---:|")
for wbits in (4, 8):
    for wq, aq in ((True, False), (False, True), (True, True)):
        for bal in (False, True):
            plan = Q.resolve(rules(wbits, bal, wq, aq), ops)
            st = plan.init(stats)
            out = fn(m.params, xt, t, c, quant=plan.bind(st, step=0, num_steps=10))
            e = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            print(f"| {'int%d/channel' % wbits if wq else 'FP'} | {'int8/tensor' if aq else 'FP'} | {bal} | {e:.4f} |", flush=True)
# how far the balancing stretches the weights' per-output-channel ranges
bal = Q.ChannelBalance(alpha=0.5, salience="ssc")
from jdq.models.base import flatten_params
flat = flatten_params(m.params)
for site in ("blocks.3.attn.qkv", "blocks.3.mlp.fc1", "blocks.3.attn.proj"):
    a = stats[site + ":act"]
    sc = np.asarray(bal.scales(np.asarray(a["ssc_num"]).sum(0) / np.asarray(a["ssc_den"]).sum(), a["weight_absmax_channel"]))
    W = np.asarray(flat[site + ".kernel"])
    def crest(M):  # per output column: max|w| / rms(w): the larger, the coarser a per-column grid for the typical weight
        return float(np.median(np.abs(M).max(0) / np.sqrt((M ** 2).mean(0))))
    ax = np.asarray(a["absmax_channel"]).max(0)
    print(site, f"s in [{sc.min():.2f}, {sc.max():.2f}]; weight crest {crest(W):.2f} -> {crest(W * sc[:, None]):.2f}; "
          f"act channel max/median {ax.max() / np.median(ax):.2f} -> {(ax / sc).max() / np.median(ax / sc):.2f}")
