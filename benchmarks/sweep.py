"""64 quantization plans vmapped in one jitted sampler vs Python loops of jitted calls (embedded model, CPU).

Plans: the MixDiT recipe with an 8 × 8 grid of (linear, attention) outlier ratios — state, not
structure. Three ways to sample all of them, compilation included, in one process:

* ``vmapped``: ``jdq.sweep`` — the stacked states through one ``jax.jit(jax.vmap(sampler))``
  (compiled once, ``--chunk`` points per call);
* ``loop, one compilation``: 64 calls of the jitted sampler with each state as an argument (a new
  state does not recompile: jdq's own design, no vmap);
* ``loop, compile per plan``: what a script per setting does — each ratio built into its own plan
  (a new recipe closure, so a new jit cache entry and a compilation per plan). Measured on
  ``--recompile-plans`` plans and scaled linearly to 64 (each plan pays the same compilation).

Memory per point: XLA's compiled memory analysis of the vmapped program (temporaries and
outputs / points) and ``jdq.sweep.point_bytes``' conservative estimate.

    python benchmarks/sweep.py [--points 64] [--samples 4] [--steps 2] [--chunk 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

import jdq
from jdq import quant as Q
from jdq import sweep as S
from jdq.recipes import BLOCKS, LINEAR_ACTS

MODEL = os.path.join(os.path.dirname(jdq.__file__), "assets", "animal_dit")


def mixdit_rules(linear, attn):
    """The MixDiT recipe's rules with its ratios baked in (a script per setting)."""
    return [Q.rule(BLOCKS, Q.cast("mx6"), roles=("weight",)),
            Q.rule(BLOCKS, Q.outlier_split(linear, hi="mx9", lo="mx6"), roles=LINEAR_ACTS),
            Q.rule(BLOCKS, Q.outlier_split(attn, hi="mx9", lo="mx6"), roles=Q.ATTENTION_ROLES),
            Q.keep_float("*")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--recompile-plans", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    side = int(round(args.points ** 0.5))
    ratios = np.linspace(0.0, 0.35, side)
    vary = {"linear_ratio": [float(r) for r in ratios], "attn_ratio": [float(r) for r in ratios]}
    points = S.grid(vary)
    model, _ = jdq.models.load(MODEL)
    spec = S.class_spec(model, np.arange(args.samples) % 10, steps=args.steps, guidance=4.0,
                        defaults={"clip_denoised": True})
    ops = S.spec_operands(spec)
    (group,) = S.build_groups(points, ops, recipe="mixdit")
    load = os.getloadavg()
    res = {"points": len(points), "samples": args.samples, "steps": args.steps, "chunk": args.chunk,
           "loadavg_before": load, "cpus": os.cpu_count(), "jax": jax.__version__}

    # vmapped: AOT compile (timed) + run, chunks of --chunk
    t0 = time.perf_counter()
    fn = S.vmapped_sampler(spec, group.plan)
    chunk_states = jax.tree.map(lambda a: a[:args.chunk], group.states)
    compiled = fn.lower(*spec.inputs, chunk_states).compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    outs = []
    for start in range(0, len(points), args.chunk):
        st = jax.tree.map(lambda a: a[start:start + args.chunk], group.states)
        outs.append(np.asarray(compiled(*spec.inputs, st)))
    vm = np.concatenate(outs)
    t_vmap = time.perf_counter() - t0
    res.update(vmapped_s=t_vmap, vmapped_compile_s=t_compile)
    if mem is not None:
        per = (mem.temp_size_in_bytes + mem.output_size_in_bytes + mem.argument_size_in_bytes) / args.chunk
        res.update(xla_bytes_per_point=per, xla_temp_bytes=mem.temp_size_in_bytes)
    res["estimated_bytes_per_point"] = S.point_bytes(ops, jax.tree.map(lambda a: a[0], group.states),
                                                     int(np.prod(spec.shape)) * 4, args.samples, True)

    # loop with one compilation (state as argument)
    t0 = time.perf_counter()
    loop = [np.asarray(spec.run(group.plan.bind(jax.tree.map(lambda a: a[i], group.states)))) for i in range(len(points))]
    t_loop = time.perf_counter() - t0
    res.update(loop_one_compile_s=t_loop)
    res["max_abs_diff_vmapped_vs_loop"] = float(max(np.max(np.abs(a - b)) for a, b in zip(vm, loop)))

    # loop compiling per plan: k plans, each its own rules (a new jit cache entry), scaled to all points
    k = min(args.recompile_plans, len(points))
    t0 = time.perf_counter()
    for p in points[:k]:
        plan = Q.resolve(mixdit_rules(p["linear_ratio"], p["attn_ratio"]), ops)
        np.asarray(spec.run(plan.bind(plan.init())))
    t_k = time.perf_counter() - t0
    res.update(loop_recompile_measured_plans=k, loop_recompile_measured_s=t_k,
               loop_recompile_s_scaled=t_k / k * len(points))
    res["speedup_vs_loop_one_compile"] = t_loop / t_vmap
    res["speedup_vs_loop_recompile_scaled"] = res["loop_recompile_s_scaled"] / t_vmap
    res["loadavg_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    if args.json:
        from jdq.io import atomic_write_text
        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
