"""64 quantization plans vmapped in one jitted sampler vs a Python loop of jitted calls (embedded model, CPU).

Plans: the MixDiT recipe with an 8 × 8 grid of (linear, attention) outlier ratios — state, not
structure. The ways to sample all of them, each timed with its compilation (``jax.clear_caches()``
before each, ahead-of-time ``lower().compile()`` timed apart from the run):

* ``loop``: the natural user code, ``jax.jit(sample)`` of one plan state
  (``jdq.sweep.looped_sampler``) called once per point, the state an argument (one compilation);
* ``vmapped, chunk C``: ``jdq.sweep.vmapped_sampler`` — the same function under ``jax.vmap`` over
  the stacked states, ``C`` points per call (one compilation per chunk size);
* ``loop compiling each plan`` (``--recompile-plans K``): what a script per setting does — each ratio
  built into its own rules (a new jit cache entry per plan), ``K`` plans measured, scaled to all.

Both paths run the same code: the sampler quantizes the plan's weights once per call, before its
loop (``jdq.quant.hoist``). The measurements are repeated ``--reps`` times, alternating their order
(load from other processes then affects them alike); every repetition is printed and written.

Also: XLA's cost analysis of one guided denoiser call (FLOPs of the quantized and of the FP call:
the matmuls and the fake-quant element arithmetic), so achieved GFLOP/s of both paths; memory per
point from XLA's compiled memory analysis of each vmapped program and ``jdq.sweep.point_bytes`` (the old
bound; ``--memory`` compares ``jdq.sweep.sweep_bytes``, which sizes the chunks now).

    python benchmarks/sweep.py [--points 64] [--samples 4] [--steps 2] [--chunks 8,64] [--reps 2] [--json PATH]
    python benchmarks/sweep.py --profile     # one plan's call with parts of the recipe: where the time goes
    python benchmarks/sweep.py --memory --json PATH   # jdq.sweep.sweep_bytes vs XLA's memory analysis

``--device-run --out DIR`` instead measures a vmapped sweep's throughput per point on a random-weight
DiT-XL/2 on the accelerator (``--tiny``: a small random DiT, a CPU smoke test); see :func:`device_run`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
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


def _cost(compiled):
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0))}


def step_flops(spec: S.SamplerSpec, plan) -> dict:
    """XLA cost analysis of one guided denoiser call (one sampler step) with ``plan`` and in FP."""
    from jdq.sampling.loop import guided_output

    x = jnp.zeros((spec.keys.shape[0],) + tuple(spec.shape), jnp.float32)
    t = jnp.full((x.shape[0],), 500.0, jnp.float32)

    def call(params, x, t, cond, uncond, state):
        q = None if state is None else plan.bind(state)
        return guided_output(spec.fn, params, x, t, cond, uncond, spec.guidance, quant=q,
                             guided_channels=spec.guided_channels)

    out = {}
    for name, st in (("quantized", plan.init()), ("fp", None)):
        out[name] = _cost(jax.jit(call).lower(spec.params, x, t, spec.cond, spec.uncond, st).compile())
    return out


def time_loop(spec, group, n):
    """Compile the one-point sampler and call it for the first ``n`` points: (compile s, run s, samples)."""
    jax.clear_caches()
    t0 = time.perf_counter()
    fn = S.looped_sampler(spec, group.plan)
    compiled = fn.lower(*spec.inputs, jax.tree.map(lambda a: a[0], group.states)).compile()
    t1 = time.perf_counter()
    outs = [np.asarray(compiled(*spec.inputs, jax.tree.map(lambda a: a[i], group.states))) for i in range(n)]
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, np.stack(outs), compiled


def time_vmapped(spec, group, n, chunk):
    """Compile the vmapped sampler for ``chunk`` points and run the first ``n`` points: (compile s, run s, samples)."""
    jax.clear_caches()
    t0 = time.perf_counter()
    fn = S.vmapped_sampler(spec, group.plan)
    compiled = fn.lower(*spec.inputs, jax.tree.map(lambda a: a[:chunk], group.states)).compile()
    t1 = time.perf_counter()
    outs = []
    for start in range(0, n, chunk):
        st = jax.tree.map(lambda a: a[start:start + chunk], group.states)
        if jax.tree.leaves(st)[0].shape[0] < chunk:  # a last short chunk: pad by repeating its last point
            st = S.core._pad_points(st, chunk)
        outs.append(np.asarray(compiled(*spec.inputs, st)))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, np.concatenate(outs)[:n], compiled


def _mem_per_point(compiled, points, shared_bytes):
    m = compiled.memory_analysis()
    if m is None:
        return None
    per = (m.temp_size_in_bytes + m.output_size_in_bytes + m.argument_size_in_bytes - shared_bytes) / points
    return {"temp_bytes": int(m.temp_size_in_bytes), "bytes_per_point": per}


def profile(spec: S.SamplerSpec, ops, reps: int = 15) -> dict:
    """Best-of-``reps`` ms of one sampler call (one plan) with parts of the MixDiT recipe: where its time goes."""
    acts = LINEAR_ACTS + Q.ATTENTION_ROLES
    plans = {
        "fp": None,
        "mx6 weights only": Q.resolve([Q.rule(BLOCKS, Q.cast("mx6"), roles=("weight",)), Q.keep_float("*")], ops),
        "mx6 block activations only": Q.resolve([Q.rule(BLOCKS, Q.cast("mx6"), roles=acts), Q.keep_float("*")], ops),
        "outlier split (mx9 / mx6) on block activations only": Q.resolve(
            [Q.rule(BLOCKS, Q.outlier_split(0.1, hi="mx9", lo="mx6"), roles=acts), Q.keep_float("*")], ops),
        "mixdit (all of it)": Q.resolve(mixdit_rules(0.05, 0.2), ops),
    }
    out = {}
    for name, plan in plans.items():
        from jdq.sampling.loop import sample

        st = {} if plan is None else plan.init()

        def one(params, cond, keys, uncond, state, plan=plan):
            return sample(spec.fn, params, spec.sampler, cond, keys, spec.shape, uncond=uncond, guidance=spec.guidance,
                          guided_channels=spec.guided_channels, quant=None if plan is None else plan.bind(state))
        f = jax.jit(one).lower(*spec.inputs, st).compile()
        jax.block_until_ready(f(*spec.inputs, st))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*spec.inputs, st))
            ts.append(time.perf_counter() - t0)
        out[name] = min(ts) * 1e3
        print(f"{name}: {out[name]:.1f} ms (load {os.getloadavg()[0]:.1f})", flush=True)
    return out


def main(argv=None):
    """Run the CPU comparison (default) or ``--device-run``; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--chunks", default="8,64", help="comma-separated vmapped chunk sizes to time")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--recompile-plans", type=int, default=2, help="plans of the compile-per-plan loop (0: skip)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="only time one call with parts of the recipe (ms)")
    ap.add_argument("--device-run", action="store_true", help="DiT-XL/2 throughput per point (see device_run)")
    ap.add_argument("--out", default=None, help="--device-run: output folder")
    ap.add_argument("--tiny", action="store_true", help="--device-run: a small random DiT (CPU smoke test)")
    ap.add_argument("--plans", type=int, default=16, help="--device-run: points of the vmapped sweep")
    ap.add_argument("--device-samples", dest="device_samples", type=int, default=4,
                    help="--device-run: samples per plan (each with CFG: 2 model evaluations)")
    ap.add_argument("--device-steps", dest="device_steps", type=int, default=4, help="--device-run: DDIM steps")
    ap.add_argument("--max-chunk", type=int, default=None, help="--device-run: at most this many points per call")
    ap.add_argument("--memory", action="store_true",
                    help="only the chunk-sizing memory estimate vs XLA's memory analysis (CPU; see memory_run)")
    args = ap.parse_args(argv)
    if args.memory:
        return memory_run(args)
    if args.device_run:
        return device_run(args)
    chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    side = int(round(args.points ** 0.5))
    ratios = np.linspace(0.0, 0.35, side)
    vary = {"linear_ratio": [float(r) for r in ratios], "attn_ratio": [float(r) for r in ratios]}
    points = S.grid(vary)
    n = len(points)
    model, _ = jdq.models.load(MODEL)
    spec = S.class_spec(model, np.arange(args.samples) % 10, steps=args.steps, guidance=4.0,
                        defaults={"clip_denoised": True})
    ops = S.spec_operands(spec)
    if args.profile:
        print(json.dumps(profile(spec, ops), indent=2))
        return 0
    (group,) = S.build_groups(points, ops, recipe="mixdit")
    res = {"points": n, "samples": args.samples, "steps": args.steps, "chunks": chunks, "reps": args.reps,
           "cpus": os.cpu_count(), "jax": jax.__version__, "loadavg_start": os.getloadavg(), "runs": []}
    flops = step_flops(spec, group.plan)
    res["flops_per_point"] = {k: v["flops"] * args.steps for k, v in flops.items()}
    res["xla_cost_one_step"] = flops
    shared = S.core.tree_bytes(spec.inputs)
    ref = None
    for rep in range(args.reps):
        order = ["loop"] + [f"vmapped:{c}" for c in chunks]
        if rep % 2:
            order = order[::-1]
        for what in order:
            load0 = os.getloadavg()[0]
            if what == "loop":
                tc, tr, x, compiled = time_loop(spec, group, n)
                mem = _mem_per_point(compiled, 1, shared)
                chunk = 1
            else:
                chunk = int(what.split(":")[1])
                tc, tr, x, compiled = time_vmapped(spec, group, n, chunk)
                mem = _mem_per_point(compiled, chunk, shared)
            if ref is None:
                ref = x
            run = {"rep": rep, "what": what, "chunk": chunk, "compile_s": tc, "run_s": tr, "total_s": tc + tr,
                   "run_ms_per_point": tr / n * 1e3, "gflops_per_s": res["flops_per_point"]["quantized"] * n / tr / 1e9,
                   "loadavg_1min": [load0, os.getloadavg()[0]], "memory": mem,
                   "max_abs_diff_vs_first": float(np.max(np.abs(x - ref)))}
            res["runs"].append(run)
            print(json.dumps(run), flush=True)
    # compile-per-plan loop: each plan its own rules (a new jit cache entry), scaled to all points
    k = min(args.recompile_plans, n)
    if k:
        jax.clear_caches()
        t0 = time.perf_counter()
        for p in points[:k]:
            plan = Q.resolve(mixdit_rules(p["linear_ratio"], p["attn_ratio"]), ops)
            np.asarray(spec.run(plan.bind(plan.init())))
        t_k = time.perf_counter() - t0
        res.update(loop_recompile_measured_plans=k, loop_recompile_measured_s=t_k, loop_recompile_s_scaled=t_k / k * n)
    res["estimated_bytes_per_point"] = S.point_bytes(ops, jax.tree.map(lambda a: a[0], group.states),
                                                     int(np.prod(spec.shape)) * 4, args.samples, True)
    # summary per repetition: vmapped (each chunk) vs the loop of the same repetition
    summary = []
    for rep in range(args.reps):
        rows = {r["what"]: r for r in res["runs"] if r["rep"] == rep}
        loop = rows["loop"]
        for c in chunks:
            v = rows[f"vmapped:{c}"]
            summary.append({"rep": rep, "chunk": c, "loop_total_s": loop["total_s"], "vmapped_total_s": v["total_s"],
                            "speedup_total": loop["total_s"] / v["total_s"],
                            "speedup_run_only": loop["run_s"] / v["run_s"],
                            "bound_if_vmapped_run_were_free": loop["total_s"] / v["compile_s"]})
    res["summary"] = summary
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps({"summary": summary, "flops_per_point": res["flops_per_point"],
                      "estimated_bytes_per_point": res["estimated_bytes_per_point"],
                      **{k_: res[k_] for k_ in ("loop_recompile_s_scaled",) if k_ in res}}, indent=2))
    if args.json:
        from jdq.io import atomic_write_text
        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
    return 0


def memory_check(spec, points, recipe, chunks) -> dict:
    """``jdq.sweep.sweep_bytes`` vs XLA's memory analysis of the vmapped program at ``chunks`` points (and ``point_bytes``)."""
    import jdq.sweep.core as C

    ops = S.spec_operands(spec)
    (group,) = S.build_groups(points, ops, recipe=recipe)
    state0 = jax.tree.map(lambda a: a[0], group.states)
    t0 = time.perf_counter()
    est = C.sweep_bytes(spec, group.plan, state0)
    res = {"estimate_per_point": est.per_point, "estimate_shared": est.shared,
           "estimate_s": time.perf_counter() - t0,
           "old_bound_per_point": C.point_bytes(ops, state0, int(np.prod(spec.shape)) * 4, spec.keys.shape[0],
                                                spec.uncond is not None) + C.hoisted_bytes(group.plan, state0,
                                                                                           spec.sampler.num_steps),
           "chunks": []}
    fn = S.vmapped_sampler(spec, group.plan)
    for c in chunks:
        m = fn.lower(*spec.inputs, jax.tree.map(lambda a: a[:c], group.states)).compile().memory_analysis()
        xla = m.temp_size_in_bytes + m.output_size_in_bytes + C.tree_bytes(state0) * c  # + the chunk's states
        row = {"chunk": c, "xla_bytes": int(xla), "estimate_bytes": est.total(c), "old_bound_bytes": res["old_bound_per_point"] * c}
        row.update(estimate_over_xla=row["estimate_bytes"] / xla, old_over_xla=row["old_bound_bytes"] / xla)
        res["chunks"].append(row)
        print(json.dumps(row), flush=True)
    return res


def memory_run(args) -> int:
    """The chunk-sizing estimate vs XLA on the CPU: a tiny DiT, a second tiny DiT, the embedded model; DiT-XL/2 estimated only."""
    from jdq.models import dit

    chunks = [1, 4, 16]
    ratios = {"ratio": [float(r) for r in np.linspace(0.0, 0.35, 16)]}
    res = {"jax": jax.__version__, "backend": jax.default_backend(), "chunks": chunks}
    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    spec = S.class_spec(dit.from_config(cfg, key=1), np.array([0, 2]), steps=2, guidance=4.0)
    res["tiny (8px/4, 32 wide, depth 1; 2 samples x CFG, 2 DDPM steps)"] = memory_check(spec, S.grid(ratios), "mixdit", chunks)
    cfg = dit.Config(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    spec = S.class_spec(dit.from_config(cfg, key=2), np.arange(3), steps=3, guidance=1.5, sampler="ddim")
    res["tiny-2 (16px/2, 64 wide, depth 2; 3 samples x CFG, 3 DDIM steps)"] = memory_check(
        spec, S.grid({"linear_ratio": [0.0, 0.1, 0.2, 0.3], "attn_ratio": [0.0, 0.1, 0.2, 0.3]}), "mixdit", chunks)
    model, _ = jdq.models.load(MODEL)
    spec = S.class_spec(model, np.arange(4), steps=2, guidance=4.0, defaults={"clip_denoised": True})
    res["embedded (4 samples x CFG, 2 DDPM steps)"] = memory_check(spec, S.grid(ratios), "mixdit", chunks)
    # DiT-XL/2 as the device run (results/sweep_device_run1.json): abstract params, estimate only
    import jdq.sweep.core as C

    cfg = dit.Config.variant("XL/2", 256, dtype="bfloat16")
    model = dit.from_config(cfg, abstract=True)
    model = model.replace(params=jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype),
        model.params))
    spec = S.class_spec(model, np.arange(1), steps=4, sampler="ddim", guidance=1.5)
    ops = S.spec_operands(spec)
    (group,) = S.build_groups(S.grid({"ratio": [0.0, 0.35]}), ops, recipe="mixdit")
    state0 = jax.tree.map(lambda a: a[0], group.states)
    est = C.sweep_bytes(spec, group.plan, state0)
    res["DiT-XL/2 (1 sample x CFG, 4 DDIM steps; estimate only)"] = {
        "estimate_per_point": est.per_point, "estimate_shared": est.shared,
        "estimate_bytes_at_1": est.total(1), "estimate_bytes_at_20": est.total(20),
        "old_bound_per_point": C.point_bytes(ops, state0, int(np.prod(spec.shape)) * 4, 1, True)}
    gpu = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sweep_device_run1.json")
    if os.path.exists(gpu):  # XLA's analysis on the H200 (one plan: temporaries; vmapped: (temp + output) / chunk)
        with open(gpu) as f:
            d = json.load(f)
        xl = res["DiT-XL/2 (1 sample x CFG, 4 DDIM steps; estimate only)"]
        xl["h200_run1_xla_bytes_at_1"] = d["one_plan_temp_bytes"]
        xl[f"h200_run1_xla_bytes_at_{d['chunk']}"] = d["vmapped_bytes_per_point"] * d["chunk"]
        xl["estimate_over_h200_xla_at_1"] = est.total(1) / d["one_plan_temp_bytes"]
        xl[f"estimate_over_h200_xla_at_{d['chunk']}"] = est.total(d["chunk"]) / (d["vmapped_bytes_per_point"] * d["chunk"])
    print(json.dumps(res, indent=2))
    if args.json:
        from jdq.io import atomic_write_text
        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
    return 0


def _median_call(compiled, args_, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args_))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), [float(t) for t in ts]


def device_run(args):
    """Throughput per point of a vmapped MixDiT ratio sweep vs one plan per call, on random-weight DiT-XL/2 (bf16).

    ``--plans`` points (the MixDiT recipe, ``ratio`` in 0…0.35), ``--samples`` samples each with
    classifier-free guidance (2 model evaluations per sample), ``--steps`` DDIM steps. One plan: the
    one-point sampler (``looped_sampler``) compiled once and called ``--reps`` times (median). Vmapped:
    ``vmapped_sampler`` at the chunk that the device memory holds (``jdq.sweep.chunk_size`` from
    ``sweep_bytes`` and the device's free bytes, at most ``--plans`` and ``--max-chunk``; it halves on
    an out-of-memory error), compiled once and called ``--reps`` times over all the plans. Writes
    ``sweep_device.json`` / ``.md`` to ``--out``.
    """
    import jdq.sweep.core as C
    from jdq.io import atomic_write_text
    from jdq.models import dit

    out = args.out or os.environ.get("OUT") or "benchmarks/results/latest"
    os.makedirs(out, exist_ok=True)
    if args.tiny:
        cfg = dit.Config(input_size=8, patch_size=2, hidden_size=128, depth=2, num_heads=2, num_classes=10,
                         dtype="bfloat16")
        plans, samples, steps, reps = min(args.plans, 4), 2, 2, 2
    else:
        cfg = dit.Config.variant("XL/2", 256, dtype="bfloat16")
        plans, samples, steps, reps = args.plans, args.device_samples, args.device_steps, 3
    t_start = time.perf_counter()
    model = dit.from_config(cfg, key=0).astype(jnp.bfloat16)
    spec = S.class_spec(model, np.arange(samples) % cfg.num_classes, steps=steps, sampler="ddim", guidance=1.5)
    ops = S.spec_operands(spec)
    points = S.grid({"ratio": [float(r) for r in np.linspace(0.0, 0.35, plans)]})
    (group,) = S.build_groups(points, ops, recipe="mixdit")
    dev = jax.devices()[0]
    res = {"device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
           "model": "random DiT tiny" if args.tiny else "random DiT-XL/2 256 (bf16)", "recipe": "mixdit",
           "plans": plans, "samples_per_plan": samples, "model_evals_per_plan_step": 2 * samples, "steps": steps,
           "sampler": "ddim", "guidance": 1.5, "reps": reps}
    state0 = jax.tree.map(lambda a: a[0], group.states)
    est = C.sweep_bytes(spec, group.plan, state0)
    per_point, shared = int(est.per_point * C.MEMORY_SAFETY), int(est.shared * C.MEMORY_SAFETY)
    res.update(estimated_bytes_per_point=per_point, estimated_shared_bytes=shared,
               old_bound_bytes_per_point=C.point_bytes(ops, state0, int(np.prod(spec.shape)) * 4, samples, True))

    # one plan per call
    t0 = time.perf_counter()
    one = S.looped_sampler(spec, group.plan).lower(*spec.inputs, state0).compile()
    res["one_plan_compile_s"] = time.perf_counter() - t0
    med, ts = _median_call(one, (*spec.inputs, state0), reps)
    res.update(one_plan_s=med, one_plan_calls_s=ts)
    mem = one.memory_analysis()
    if mem is not None:
        res["one_plan_temp_bytes"] = int(mem.temp_size_in_bytes)

    # vmapped, chunk sized to memory
    chunk = C.chunk_size(plans, per_point, max_chunk=args.max_chunk, shared=shared)
    while True:
        try:
            t0 = time.perf_counter()
            fn = S.vmapped_sampler(spec, group.plan)
            states = jax.tree.map(lambda a: a[:chunk], group.states)
            vm = fn.lower(*spec.inputs, states).compile()
            compile_s = time.perf_counter() - t0
            chunks = [jax.tree.map(lambda a, s=s_: a[s:s + chunk], group.states) for s_ in range(0, plans, chunk)]
            chunks = [C._pad_points(c, chunk) for c in chunks]

            def all_chunks():
                return [vm(*spec.inputs, c) for c in chunks]
            jax.block_until_ready(all_chunks())  # warm
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(all_chunks())
                ts.append(time.perf_counter() - t0)
            break
        except Exception as e:  # XLA reports an out-of-memory as a runtime error: retry with half the chunk
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower() or chunk == 1:
                raise
            res.setdefault("oom_chunks", []).append(chunk)
            chunk = max(1, chunk // 2)
    mem = vm.memory_analysis()
    res.update(chunk=chunk, calls_per_sweep=len(chunks), vmapped_compile_s=compile_s,
               vmapped_sweep_s=float(np.median(ts)), vmapped_sweep_calls_s=[float(t) for t in ts])
    if mem is not None:
        res["vmapped_temp_bytes"] = int(mem.temp_size_in_bytes)
        res["vmapped_bytes_per_point"] = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / chunk
    stats = getattr(dev, "memory_stats", lambda: None)()
    if stats:
        res["device_peak_bytes"] = int(stats.get("peak_bytes_in_use", 0))
    res["one_plan_s_per_point"] = res["one_plan_s"]
    res["vmapped_s_per_point"] = res["vmapped_sweep_s"] / plans
    res["throughput_speedup_per_point"] = res["one_plan_s_per_point"] / res["vmapped_s_per_point"]
    images = plans * samples
    res["loop_sweep_s_incl_compile"] = res["one_plan_compile_s"] + plans * res["one_plan_s"]
    res["vmapped_sweep_s_incl_compile"] = res["vmapped_compile_s"] + res["vmapped_sweep_s"]
    res["speedup_incl_compile"] = res["loop_sweep_s_incl_compile"] / res["vmapped_sweep_s_incl_compile"]
    res["images_per_s"] = {"one_plan": samples / res["one_plan_s"], "vmapped": images / res["vmapped_sweep_s"]}
    res["wall_s"] = time.perf_counter() - t_start
    md = [f"# Sweep throughput per point: {res['model']}, {res['device']}", "",
          f"MixDiT recipe, {plans} plans (ratio 0…0.35), {samples} samples × CFG per plan, {steps} DDIM steps; "
          f"vmapped chunk {chunk} ({len(chunks)} call(s) per sweep); median of {reps} timed runs after compilation.", "",
          "| way | compile s | s per sweep of all plans | s per plan | images / s | × one plan (per plan) |",
          "|---|---:|---:|---:|---:|---:|",
          f"| one plan per call | {res['one_plan_compile_s']:.1f} | {plans * res['one_plan_s']:.3f} | "
          f"{res['one_plan_s']:.4f} | {res['images_per_s']['one_plan']:.1f} | 1.00 |",
          f"| vmapped, {chunk} plans per call | {res['vmapped_compile_s']:.1f} | {res['vmapped_sweep_s']:.3f} | "
          f"{res['vmapped_s_per_point']:.4f} | {res['images_per_s']['vmapped']:.1f} | "
          f"{res['throughput_speedup_per_point']:.2f} |", "",
          f"Including compilation: loop {res['loop_sweep_s_incl_compile']:.1f} s, vmapped "
          f"{res['vmapped_sweep_s_incl_compile']:.1f} s ({res['speedup_incl_compile']:.2f}×). Memory per point: "
          f"{res.get('vmapped_bytes_per_point', float('nan')) / 2**20:.1f} MiB by XLA's analysis of the vmapped program, "
          f"{est.total(chunk) / chunk / 2**20:.1f} MiB estimated (sweep_bytes: {per_point / 2**20:.1f} MiB per point + "
          f"{shared / 2**20:.0f} MiB shared), {res['old_bound_bytes_per_point'] / 2**20:.0f} MiB by the old bound "
          f"(point_bytes); device peak "
          f"{res.get('device_peak_bytes', 0) / 2**30:.2f} GiB. Wall {res['wall_s']:.0f} s.", ""]
    print("\n".join(md))
    atomic_write_text(os.path.join(out, "sweep_device.json"), json.dumps(res, indent=2) + "\n")
    atomic_write_text(os.path.join(out, "sweep_device.md"), "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
