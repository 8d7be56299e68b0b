"""Bit allocation under a latency budget vs under a mean-bit budget (MixDQ's), on DiT-XL/2 shapes and the embedded model.

1. **Sensitivities** (embedded Animal-MNIST DiT): each linear layer of the blocks (adaLN modulation,
   qkv, proj, fc1, fc2; weight and input together) alone in MX9 / MX6 / MX4, the rest in float;
   score = −(relative MSE of the eps prediction vs FP), on FP samples re-noised at four timesteps.
   All 3 × 40 single-layer plans are states of one plan (``jdq.quant.select.selectable``), run as
   one vmapped forward pass.
2. **DiT-XL/2 shapes**: layer ``(block i, kind)`` of the 28-block XL takes the sensitivity of the
   embedded model's layer of the same kind at the nearest relative depth, block ``round(i · 7/27)``
   (relative MSE is an intensive quantity, so it is carried over unscaled; the layer's size enters
   through the cost, not the score). Costs: the cost model's per-layer latency on the MixDiT-like
   accelerator (``jdq.sweep.latency.site_costs``), one image with CFG (batch 2), one step.
3. **Allocations** (exact ILPs): MixDQ's mean-bit budget (``allocate_bits``, mean 6 ± 0.02 bits
   weighted by weight size) vs the most score at that allocation's latency (``allocate_latency``)
   vs the least latency at its score. Per-layer table of where they differ.
4. **The embedded model itself** (with ``--sample``): the same two budgets on its own shapes, then
   both allocations sampled (one vmapped call) and compared by PSNR / SSIM vs FP and Animal-FID.

    python benchmarks/latency_allocation.py [--hardware mixdit_like] [--avg-bits 6] [--sample] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import jdq
from jdq import quant as Q
from jdq import sweep as S
from jdq.hw import OperandFormat, workload
from jdq.quant.select import selectable
from jdq.sweep import latency as L

MODEL = os.path.join(os.path.dirname(jdq.__file__), "assets", "animal_dit")
KINDS = ("adaLN_modulation", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
FORMATS = ("mx9", "mx6", "mx4")
BITS = (9, 6, 4)


def linear_sites(operands):
    """``blocks.{i}.{kind}`` sites in model order."""
    return [o.site for o in operands if o.role == "weight" and o.site.startswith("blocks.") and o.site.endswith(KINDS)]


def select_plan(operands, sites):
    """Every listed linear site (weight and input) selectable among float / MX9 / MX6 / MX4; the rest float."""
    opt = [None] + [Q.cast(f) for f in FORMATS]
    rules = [Q.rule(s, selectable(*opt), roles=("weight",) + Q.ACTIVATION_ROLES) for s in sites]
    return Q.resolve(rules + [Q.keep_float("*")], operands)


def state_for(plan, base, sites, choice):
    """The plan state with site ``sites[i]`` in option ``choice[i]`` (0 = float, 1.. = FORMATS)."""
    st = dict(base)
    for s, c in zip(sites, choice):
        for k in (f"{s}:weight", f"{s}:act", f"{s}:post_gelu"):
            if k in st:
                st[k] = dict(st[k], index=jnp.int32(c))
    return st


def sensitivities(model, samples, chunk=30):
    """``[sites, len(FORMATS)]`` relative MSE of the eps output with one site quantized, and the site list."""
    spec = S.class_spec(model, np.arange(8) % 10, steps=1)
    ops = S.spec_operands(spec)
    sites = linear_sites(ops)
    plan = select_plan(ops, sites)
    base = plan.init()
    rng = np.random.default_rng(0)
    x0 = np.asarray(samples[:8])
    t = np.array([100, 400, 700, 900] * 2, np.float32)
    from jdq.sampling.schedules import alphas_cumprod, dit_betas
    ac = alphas_cumprod(dit_betas(1000))[t.astype(int)].astype(np.float32)[:, None, None, None]
    x_t = jnp.asarray(np.sqrt(ac) * x0 + np.sqrt(1 - ac) * rng.standard_normal(x0.shape).astype(np.float32))
    y = jnp.arange(8) % 10
    c = model.config.in_channels
    ref = model.apply(model.params, x_t, jnp.asarray(t), y)[..., :c]
    states = [state_for(plan, base, [s], [j + 1]) for s in sites for j in range(len(FORMATS))]
    stacked = Q.stack_states(states)

    @jax.jit
    def rel_mse(params, st):
        out = jax.vmap(lambda s: model.apply(params, x_t, jnp.asarray(t), y, quant=plan.bind(s))[..., :c])(st)
        return jnp.mean((out - ref) ** 2, axis=(1, 2, 3, 4)) / jnp.mean(ref ** 2)

    vals = []
    for a in range(0, len(states), chunk):
        part = jax.tree.map(lambda v: v[a:a + chunk], stacked)
        n = jax.tree.leaves(part)[0].shape[0]
        if n < chunk:
            part = jax.tree.map(lambda v: jnp.concatenate([v, jnp.repeat(v[-1:], chunk - n, 0)]), part)
        vals.append(np.asarray(rel_mse(model.params, part))[:n])
    return np.concatenate(vals).reshape(len(sites), len(FORMATS)), sites


def xl_scores(rel, sites_small, depth_small, sites_xl, depth_xl):
    """Scores of the XL layers: the small model's layer of the same kind at the nearest relative depth."""
    index = {s: i for i, s in enumerate(sites_small)}
    out = []
    for s in sites_xl:
        _, b, kind = s.split(".", 2)
        src = int(round(int(b) * (depth_small - 1) / (depth_xl - 1)))
        out.append(-rel[index[f"blocks.{src}.{kind}"]])
    return np.asarray(out)


def compare(scores, costs, sizes, avg_bits):
    """The mean-bit allocation, the best score at its latency, and the least latency at its score."""
    bits_choice = Q.allocate_bits(scores, sizes, [BITS] * len(scores), avg_bits)
    idx_b = [BITS.index(b) for b in bits_choice]
    lat_b = float(sum(costs[i, j] for i, j in enumerate(idx_b)))
    score_b = float(sum(scores[i, j] for i, j in enumerate(idx_b)))
    best = L.allocate_latency(scores, costs, lat_b)
    fast = L.allocate_latency(scores, costs, None, objective="latency", score_floor=score_b * (1 + 1e-9))
    mean_bits = lambda idx: float(np.sum(np.asarray(BITS)[list(idx)] * sizes) / np.sum(sizes))  # noqa: E731
    return {
        "bit_budget": {"choice": idx_b, "latency_s": lat_b, "score": score_b, "mean_bits": mean_bits(idx_b)},
        "latency_budget": {"choice": list(best.choice), "latency_s": best.totals["latency"],
                           "score": best.totals["score"], "mean_bits": mean_bits(best.choice)},
        "least_latency": {"choice": list(fast.choice), "latency_s": fast.totals["latency"],
                          "score": fast.totals["score"], "mean_bits": mean_bits(fast.choice)},
    }


def table(sites, result, costs):
    """Markdown: layers where the allocations differ."""
    a, b, c = (result[k]["choice"] for k in ("bit_budget", "latency_budget", "least_latency"))
    lines = ["| layer | mean-bit budget | latency budget (same latency) | least latency (same score) | µs mx9/mx6/mx4 |",
             "|---|---|---|---|---|"]
    for i, s in enumerate(sites):
        if a[i] != b[i] or a[i] != c[i]:
            us = "/".join(f"{x * 1e6:.2f}" for x in costs[i])
            lines.append(f"| {s} | {FORMATS[a[i]]} | {FORMATS[b[i]]} | {FORMATS[c[i]]} | {us} |")
    lines.append("")
    lines.append("| allocation | latency / step (ms) | summed score | mean weight bits |")
    lines.append("|---|---:|---:|---:|")
    for k in ("bit_budget", "latency_budget", "least_latency"):
        r = result[k]
        lines.append(f"| {k} | {r['latency_s'] * 1e3:.4f} | {r['score']:.5f} | {r['mean_bits']:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hardware", default="mixdit_like")
    ap.add_argument("--avg-bits", type=float, default=6.0)
    ap.add_argument("--sample", action="store_true", help="also sample both allocations of the embedded model")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    hw_ = L.preset(args.hardware)
    model, _ = jdq.models.load(MODEL)
    fp_spec = S.class_spec(model, np.arange(8) % 10, steps=args.steps, guidance=4.0, defaults={"clip_denoised": True})
    rel, sites_small = sensitivities(model, np.asarray(fp_spec.run(None)))
    report = {"hardware": args.hardware, "avg_bits": args.avg_bits, "formats": FORMATS,
              "sensitivity_rel_mse": {s: rel[i].tolist() for i, s in enumerate(sites_small)}}
    md = [f"# Latency-budgeted vs mean-bit-budgeted allocation ({args.hardware})", ""]

    xl_ops = workload.model_operands("dit-xl-2", batch=2)
    sites_xl = linear_sites(xl_ops)
    table_xl = L.site_costs(hw_, xl_ops, [OperandFormat(f) for f in FORMATS])
    costs = np.stack([table_xl[s] for s in sites_xl])
    sizes = np.array([np.prod(o.shape) for o in xl_ops if o.role == "weight" and o.site in set(sites_xl)], np.float64)
    scores = xl_scores(rel, sites_small, model.config.depth, sites_xl, 28)
    res = compare(scores, costs, sizes, args.avg_bits)
    report["dit-xl-2"] = res
    md += ["## DiT-XL/2 shapes (sensitivities from the embedded model by kind and relative depth)", "",
           table(sites_xl, res, costs), ""]

    small_ops = S.spec_operands(S.class_spec(model, np.arange(2), steps=1))
    table_s = L.site_costs(hw_, small_ops, [OperandFormat(f) for f in FORMATS])
    costs_s = np.stack([table_s[s] for s in sites_small])
    sizes_s = np.array([np.prod(o.shape) for o in small_ops if o.role == "weight" and o.site in set(sites_small)], np.float64)
    res_s = compare(-rel, costs_s, sizes_s, args.avg_bits)
    report["embedded"] = res_s
    md += ["## The embedded model's own shapes", "", table(sites_small, res_s, costs_s), ""]

    if args.sample:
        from jdq.sampling.images import to_uint8
        from jdq.sweep import runner
        spec = S.class_spec(model, np.arange(args.samples) % 10, steps=args.steps, guidance=4.0,
                            defaults={"clip_denoised": True})
        ops = S.spec_operands(spec)
        plan = select_plan(ops, sites_small)
        base = plan.init()
        states = Q.stack_states([state_for(plan, base, sites_small, [j + 1 for j in res_s[k]["choice"]])
                                 for k in ("bit_budget", "latency_budget")])
        x = np.asarray(S.vmapped_sampler(spec, plan)(*spec.inputs, states))
        fp = to_uint8(np.asarray(spec.run(None)))
        from jdq.demo import animal_fid, classifier
        clf = classifier.load(animal_fid.CLASSIFIER)
        ref = animal_fid.load_reference().stats_of(animal_fid.FEATURES)
        feats = lambda im: animal_fid.extract(clf, im)[animal_fid.FEATURES]  # noqa: E731
        md += [f"Sampled ({args.samples} samples, {args.steps} DDPM steps, guidance 4; same noise as FP):", "",
               "| allocation | PSNR vs FP | SSIM vs FP | ΔAnimal-FID vs FP [95%] |", "|---|---:|---:|---|"]
        for k, xi in zip(("bit_budget", "latency_budget"), x):
            im = to_uint8(xi)
            q = runner.point_metrics(["psnr", "ssim", "dfid"], im, fp, feats(im), feats(fp), ref)
            report["embedded"][k]["sampled"] = q
            d = q["dfid"]
            md.append(f"| {k} | {q['psnr']['value']:.2f} | {q['ssim']['value']:.4f} | "
                      f"{d['value']:.2f} [{d['low']:.2f}, {d['high']:.2f}] |")
    from jdq.io import atomic_write_text
    atomic_write_text(os.path.join(args.out, "latency_allocation.json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(os.path.join(args.out, "latency_allocation.md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
