"""End to end: one DiT-XL/2-256 denoising step (batch 32 with classifier-free guidance, i.e. 64
model evaluations) in jdq bf16 vs W8A8 lowered to the Mosaic GPU kernel; weight memory of bf16,
W8 and W4 models.

Run on a GPU: ``python benchmarks/e2e.py --device-run [--budget-s S]``; on a CPU a tiny DiT runs as
a smoke test. Random weights (speed and memory do not depend on the values). The lowered step is
checked against the fake-quant step on the device before timing; each step is compiled once and
then timed as the compiled function (wall clock and CUPTI kernel time). The lowered W8A8 step
runs the one-pass token quantization kernel and the W8A8 GEMM kernel at every block linear.
Optional further steps (``--extra``: FP8, W4A8 lowered; ``fp8attn``: recipe ``w8a8-fp8attn`` lowered, the
W8A8 GEMMs plus the FP8 attention kernel) run while ``--budget-s`` lasts. Results go
to ``e2e.json`` / ``e2e.md`` under ``--out`` (default ``$OUT``, else ``benchmarks/results/latest``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest")  # raw output; the curated tables are results/*.md
TOKEN_LINEARS = "re:blocks\\.\\d+\\.(attn\\.(qkv|proj)|mlp\\.fc[12])"
ALL_BLOCK_LINEARS = "re:blocks\\.\\d+\\.(attn\\.(qkv|proj)|mlp\\.fc[12]|adaLN_modulation)"


def make_plan(model, inputs, weight_cast, act_cast=None, pattern=TOKEN_LINEARS):
    """A plan quantizing the linears matching ``pattern`` (others float)."""
    from jdq.quant import keep_float, resolve, rule, trace_operands

    ops = trace_operands(lambda *a, quant: model.apply(model.params, *a, quant=quant), *inputs)
    rules = [rule(pattern, weight_cast, roles=("weight",))]
    if act_cast is not None:
        rules.append(rule(pattern, act_cast, roles=("act", "post_gelu")))
    rules.append(keep_float("*"))
    return resolve(rules, ops)


def cfg_step(model, params, x, t, y, null, quant, guidance=4.0):
    """One guided denoiser evaluation: cond + uncond in one batch, combined eps."""
    xx = jnp.concatenate([x, x])
    tt = jnp.concatenate([t, t])
    yy = jnp.concatenate([y, jnp.full_like(y, null)])
    out = model.apply(params, xx, tt, yy, quant=quant)
    eps = out[..., : x.shape[-1]]
    cond, uncond = jnp.split(eps, 2)
    return uncond + guidance * (cond - uncond)


def timed(fn, args, iters):
    """(median wall ms, median CUPTI kernel ms or None) of the jitted ``fn(*args)`` (no re-jit)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    dev = None
    if jax.default_backend() == "gpu":
        try:
            from jax.experimental.mosaic.gpu import profiler

            _, ks = profiler.measure(fn, iterations=iters)(*args)
            dev = statistics.median(ks) if ks else None
        except Exception as e:  # noqa: BLE001
            print("  cupti failed:", type(e).__name__, str(e)[:120])
    return statistics.median(ts), dev


KERNEL_CATEGORIES = (  # (category, lower-case name fragments); first match wins
    ("Pallas (jdq kernels)", ("mosaic", "w8a8", "quantize_rows", "w4a8", "weight_only", "mixdit", "mx_matmul")),
    ("attention (cuDNN)", ("cudnn", "fmha", "flash", "attention")),
    ("GEMM (cuBLAS / XLA dot)", ("nvjet", "gemm", "xmma", "cutlass", "sm90", "cublas", "dot")),
)


def kernel_category(name: str) -> str:
    """The profile category of a GPU kernel, from its name (see ``KERNEL_CATEGORIES``)."""
    low = name.lower()
    return next((cat for cat, frags in KERNEL_CATEGORIES if any(f in low for f in frags)), "other (XLA fusions, copies)")


def kernel_breakdown(fn, args, iters=3):
    """Per-kernel CUPTI times of ``fn(*args)``: {"kernels": [[name, calls, ms]...], "categories": {cat: ms}} per step."""
    from jax.experimental.mosaic.gpu import profiler

    _, runs = profiler.measure(fn, aggregate=False, iterations=iters)(*args)
    per = {}
    for run in runs:
        for name, ms in run:
            c, t = per.get(name, (0, 0.0))
            per[name] = (c + 1, t + ms)
    kernels = sorted(([n, c / len(runs), t / len(runs)] for n, (c, t) in per.items()), key=lambda r: -r[2])
    cats = {}
    for name, _, ms in kernels:
        cats[kernel_category(name)] = cats.get(kernel_category(name), 0.0) + ms
    return {"kernels": kernels, "categories": cats}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-run", action="store_true")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None, help="folder for results (default $OUT, else benchmarks/results/latest)")
    p.add_argument("--budget-s", type=float, default=210.0, help="skip optional steps after this long")
    p.add_argument("--extra", default="fp8,w4a8", help="further lowered steps to time if the budget allows")
    p.add_argument("--w4-speed", action="store_true", help="also time W4A16 / W8A16 steps at batch 1")
    p.add_argument("--profile", action="store_true", help="per-kernel CUPTI breakdown of each timed step (GPU)")
    p.add_argument("--small-batches", default="", help="also time bf16 and W8A8 lowered steps at these batches, e.g. 1,2")
    p.add_argument("--recipes", default="", help="time the fake-quant step of these recipes ('all': every registered one)")
    p.add_argument("--xla-quant", action="store_true", help="also time the lowered step with XLA's activation quantization")
    args = p.parse_args(argv)
    t_start = time.time()
    out_dir = args.out or os.environ.get("OUT") or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    from jdq.models import dit
    from jdq.models.layers import FUSED_BLOCK_ENV
    from jdq.quant.casts import cast
    from jdq.kernels.lower import lower, weight_bytes

    on_gpu = jax.default_backend() == "gpu"
    if args.device_run and not on_gpu:
        raise SystemExit("--device-run needs a GPU")
    if on_gpu:
        cfg = dit.Config.variant("XL/2", 256, dtype="bfloat16")
        bsz = args.batch
    else:
        cfg = dit.Config(input_size=8, patch_size=2, hidden_size=128, depth=2, num_heads=2, num_classes=10, dtype="bfloat16")
        bsz = 2
    model = dit.from_config(cfg, key=0).astype(jnp.bfloat16)
    k1, k2 = jax.random.split(jax.random.key(1))
    x = jax.random.normal(k1, (bsz, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.bfloat16)
    t = jnp.full((bsz,), 500.0)
    y = jax.random.randint(k2, (bsz,), 0, cfg.num_classes)
    null = cfg.num_classes
    full_inputs = (jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, y]))
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "batch": bsz, "model_evals": 2 * bsz}
    print(f"jax {jax.__version__} {res['device']}  DiT hidden {cfg.hidden_size} depth {cfg.depth}  batch {bsz} (x2 for CFG)", flush=True)

    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    rel = lambda a, b: float(jnp.linalg.norm(f32(a) - f32(b)) / jnp.linalg.norm(f32(b)))  # noqa: E731
    over = lambda frac=1.0: time.time() - t_start > args.budget_s * frac  # noqa: E731
    save = lambda: write_json(os.path.join(out_dir, "e2e.json"), res)  # noqa: E731

    w8a8 = make_plan(model, full_inputs, cast("int8", granularity="row"), cast("int8", granularity="row"))
    t0 = time.time()
    q_w8a8 = lower(w8a8, model.params)
    print(f"lowered {len(q_w8a8.weights)} W8A8 sites in {time.time() - t0:.1f}s", flush=True)
    # one jitted step per JDQ_FUSED_BLOCK setting (read at trace time): "1" hands the adaLN norm, the gated
    # residual and the q/k/v split to the kernels / splits the qkv matmul, "0" runs them as separate ops
    steps = {f: jax.jit(lambda params, q, x, t, y: cfg_step(model, params, x, t, y, null, q)) for f in ("1", "0")}
    step = steps["1"]
    outs, res["compile_s"], res["times"] = {}, {}, {}

    def run(name, q, time_it=True, fused=True, inputs=None):
        """Compile + run the step with quantizer ``q``, then time the compiled step; False if it failed."""
        step = steps["1" if fused else "0"]
        xa, ta, ya = inputs or (x, t, y)
        t0 = time.time()
        old = os.environ.get(FUSED_BLOCK_ENV)
        os.environ[FUSED_BLOCK_ENV] = "1" if fused else "0"
        try:
            outs[name] = jax.block_until_ready(step(model.params, q, xa, ta, ya))
        except Exception as e:  # noqa: BLE001  (a kernel that fails to build must not end the run)
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"FAILED {name}: {res['errors'][name]}", flush=True)
            return False
        finally:
            if old is None:
                os.environ.pop(FUSED_BLOCK_ENV, None)
            else:
                os.environ[FUSED_BLOCK_ENV] = old
        res["compile_s"][name] = time.time() - t0
        print(f"compiled+ran {name} in {time.time() - t0:.1f}s  [{time.time() - t_start:.0f}s]", flush=True)
        if time_it:
            wall, dev = timed(step, (model.params, q, xa, ta, ya), args.iters)
            res["times"][name] = {"wall_ms": wall, "kernel_ms": dev}
            b = res["times"].get("bf16" if inputs is None else f"b{xa.shape[0]}_bf16")
            v = res["times"][name]
            if b:
                v["speedup_wall"] = b["wall_ms"] / wall
                v["speedup_kernel"] = (b["kernel_ms"] / dev) if (b["kernel_ms"] and dev) else None
            print(f"step {name:24s} wall {wall:8.2f} ms  kernels {dev if dev is None else round(dev, 2)} ms", flush=True)
            if args.profile and on_gpu:
                try:
                    prof = res.setdefault("profile", {})[name] = kernel_breakdown(step, (model.params, q, xa, ta, ya))
                    print("  " + ", ".join(f"{c} {ms:.2f} ms" for c, ms in prof["categories"].items()), flush=True)
                except Exception as e:  # noqa: BLE001
                    print("  profile failed:", type(e).__name__, str(e)[:200], flush=True)
        save()
        return True

    # 1. the goal: bf16 vs W8A8 lowered (LayerNorm+modulation+quantization and token quantization kernels, W8A8
    #    GEMMs with split q/k/v outputs and fused gated residuals), and the lowered step with the block ops
    #    unfused (XLA norm + slices + residual; the bf16 step computes them the same way either way)
    run("bf16", None)
    run("w8a8_lowered", q_w8a8)
    if on_gpu:
        run("w8a8_lowered_unfused", q_w8a8, fused=False)
        if args.xla_quant:  # the same GEMM kernels with XLA's two-pass activation quantization
            run("w8a8_lowered_xla_quant", q_w8a8.with_impl("gpu_xla_quant"), fused=False)
        for a_, b_ in (("w8a8_lowered", "w8a8_lowered_unfused"),):
            if a_ in outs and b_ in outs:  # fused vs unfused block ops: the same function up to bf16 rounding
                res[f"relerr_{a_}_vs_unfused"] = rel(outs[a_], outs[b_])
    # 2. numerics of the lowered step against the fake-quant step
    if run("w8a8_fake_quant", w8a8.bind(w8a8.init()), time_it=not over(0.5)):
        main_name = next((n for n in ("w8a8_lowered", "w8a8_lowered_xla_quant") if n in outs), None)
        if main_name is not None:
            res["relerr_lowered_vs_fakequant"] = rel(outs[main_name], outs["w8a8_fake_quant"])
            res["finite"] = bool(jnp.all(jnp.isfinite(f32(outs[main_name]))))
        res["relerr_fakequant_vs_bf16"] = rel(outs["w8a8_fake_quant"], outs["bf16"])
    if not over(0.5):
        run("w8a8_xla_int8", q_w8a8.with_impl("xla"))
        if "w8a8_lowered" in outs and "w8a8_xla_int8" in outs:
            res["relerr_lowered_vs_xla_int8"] = rel(outs["w8a8_lowered"], outs["w8a8_xla_int8"])
    print("check (bf16): " + ", ".join(f"{k}={v}" for k, v in res.items() if k.startswith("relerr") or k == "finite"),
          flush=True)
    # 3. float32 exactness on a 2-block model of XL width: kernel path == fake-quant path up to float rounding
    if on_gpu and not over(0.6):
        t0 = time.time()
        small = dit.from_config(dit.Config.variant("XL/2", 256, depth=2), key=0)
        sp = make_plan(small, full_inputs, cast("int8", granularity="row"), cast("int8", granularity="row"))
        sq = lower(sp, small.params)
        fwd = jax.jit(lambda params, q, *a: small.apply(params, *a, quant=q))
        o_fake = fwd(small.params, sp.bind(sp.init()), *full_inputs)
        res["f32_depth2"] = {"fakequant_vs_float": rel(o_fake, fwd(small.params, None, *full_inputs))}
        for impl in ("gpu", "xla"):
            try:
                res["f32_depth2"][f"{impl}_vs_fakequant"] = rel(fwd(small.params, sq.with_impl(impl), *full_inputs), o_fake)
            except Exception as e:  # noqa: BLE001
                res["f32_depth2"][f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"check (float32, depth 2): {res['f32_depth2']}  [{time.time() - t0:.0f}s]", flush=True)
        save()
    # 4. further lowered steps while the budget lasts
    extra_casts = {"fp8": (cast("fp8_e4m3"), cast("fp8_e4m3")),
                   "w4a8": (cast("int4", granularity="group", group_size=64), cast("int8", granularity="row"))}
    for name in [e for e in args.extra.split(",") if e]:
        if name not in extra_casts and name != "fp8attn":
            raise SystemExit(f"--extra: unknown step {name!r}; known: {sorted(extra_casts) + ['fp8attn']}")
        if over(0.7):
            print(f"skipping {name}_lowered: budget", flush=True)
            continue
        if name == "fp8attn":  # recipe w8a8-fp8attn lowered: W8A8 GEMMs and the FP8 attention kernel
            from jdq import recipes
            from jdq.quant import trace_operands

            ops = trace_operands(lambda *a, quant: model.apply(model.params, *a, quant=quant), *full_inputs)
            q = lower(recipes.plan_for("w8a8-fp8attn", ops), model.params)
            print(f"fp8attn: {len(q.attention)} FP8 attention sites", flush=True)
        else:
            q = lower(make_plan(model, full_inputs, *extra_casts[name]), model.params)
        if run(f"{name}_lowered", q):
            res[f"relerr_{name}_lowered_vs_bf16"] = rel(outs[f"{name}_lowered"], outs["bf16"])
    # 5. weight memory: every linear of the blocks lowered (token linears + adaLN modulation)
    if not over(0.9):
        mem = {"bf16": weight_bytes(model.params)}
        for label, wc in [("w8", cast("int8", granularity="row")), ("w4_g128", cast("int4", granularity="group", group_size=128)),
                          ("w4_channel", cast("int4", granularity="row"))]:
            plan = make_plan(model, full_inputs, wc, None, ALL_BLOCK_LINEARS)
            mem[label] = weight_bytes(model.params, lower(plan, model.params, check=False))
        res["weight_bytes"] = mem
        for k, v in mem.items():
            print(f"weights {k:10s} {v['bytes'] / 2**20:9.1f} MiB  ({mem['bf16']['bytes'] / v['bytes']:.2f}x smaller than bf16, "
                  f"{v['lowered_sites']} sites packed)", flush=True)
    save()

    # 6. small batches (CFG doubles them): bf16 vs W8A8 lowered
    for bs in [int(v) for v in args.small_batches.split(",") if v]:
        if over(0.85):
            print(f"skipping batch {bs}: budget", flush=True)
            break
        sub = (x[:bs], t[:bs], y[:bs])
        run(f"b{bs}_bf16", None, inputs=sub)
        run(f"b{bs}_w8a8_lowered", q_w8a8, inputs=sub)
    # 7. fake-quant sampling steps of every registered recipe (the accuracy path), against the bf16 step
    if args.recipes:
        time_recipes(args.recipes, model, full_inputs, run, res, over)
    save()

    if args.w4_speed:
        xb, tb, yb = x[:1], t[:1], y[:1]
        wall, dev = timed(step, (model.params, None, xb, tb, yb), args.iters)
        res["times"]["b1_bf16"] = {"wall_ms": wall, "kernel_ms": dev}
        print(f"batch-1 step bf16         wall {wall:8.2f} ms kernels {dev if dev is None else round(dev, 2)} ms", flush=True)
        for label, wc in [("w8a16", cast("int8", granularity="row")), ("w4a16_g128", cast("int4", granularity="group", group_size=128))]:
            plan = make_plan(model, full_inputs, wc, None, TOKEN_LINEARS)
            q = lower(plan, model.params)
            for nm, qq in [(label, q)]:
                wall, dev = timed(step, (model.params, qq, xb, tb, yb), args.iters)
                res["times"][f"b1_{nm}"] = {"wall_ms": wall, "kernel_ms": dev}
                print(f"batch-1 step {nm:12s} wall {wall:8.2f} ms kernels {dev if dev is None else round(dev, 2)} ms", flush=True)

    res["seconds"] = time.time() - t_start
    write_json(os.path.join(out_dir, "e2e.json"), res)
    md = render_markdown(res)
    with open(os.path.join(out_dir, "e2e.md.tmp"), "w") as f:
        f.write(md)
    os.replace(os.path.join(out_dir, "e2e.md.tmp"), os.path.join(out_dir, "e2e.md"))
    print("\n" + md)
    return 0


def time_recipes(spec, model, inputs, run, res, over):
    """Time the fake-quant CFG step of each recipe in ``spec`` ("all" or a comma list); calibrated ones get
    statistics of one forward pass on ``inputs`` (random weights: speed does not depend on the values)."""
    from jdq import recipes
    from jdq.quant import trace_operands
    from jdq.quant.calibrate import collect_stats, stack_stats

    names = recipes.names() if spec == "all" else [n for n in spec.split(",") if n]
    ops = trace_operands(lambda *a, quant: model.apply(model.params, *a, quant=quant), *inputs)
    stats = None
    for name in names:
        if over(0.95):
            print(f"skipping recipe {name}: budget", flush=True)
            continue
        t0 = time.time()
        try:
            plan = recipes.plan_for(name, ops)
            if recipes.get(name).calibrated and stats is None:
                stats = stack_stats([collect_stats(lambda *a, quant: model.apply(model.params, *a, quant=quant),
                                                   *inputs)[1]])
            q = plan.bind(plan.init(stats if recipes.get(name).calibrated else None))
        except Exception as e:  # noqa: BLE001  (a recipe that needs more than statistics must not end the run)
            res.setdefault("errors", {})[f"recipe_{name}"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"recipe {name}: not timed ({type(e).__name__}: {str(e)[:160]})", flush=True)
            continue
        res.setdefault("recipe_setup_s", {})[name] = time.time() - t0
        run(f"recipe_{name}", q)


def write_json(path, obj):
    """Atomic JSON write (temp file + rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def render_markdown(res):
    """The step-time table and the weight-memory table."""
    lines = [f"jax {res['jax']}, {res['device']}; DiT step batch {res['batch']} with CFG ({res['model_evals']} evaluations)",
             "", "| step | wall ms | kernel ms (CUPTI) | speed-up vs bf16 (wall / kernel) |", "|---|---|---|---|"]
    for name, v in res.get("times", {}).items():
        sk = f"{v['speedup_kernel']:.2f}" if v.get("speedup_kernel") else "-"
        sw = f"{v['speedup_wall']:.2f}" if v.get("speedup_wall") else "-"
        km = "-" if v["kernel_ms"] is None else f"{v['kernel_ms']:.2f}"
        lines.append(f"| {name} | {v['wall_ms']:.2f} | {km} | {sw} / {sk} |")
    if res.get("compile_s"):
        lines += ["", "compile + first run (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["compile_s"].items())]
    checks = {k: v for k, v in res.items() if k.startswith("relerr") or k in ("finite", "f32_depth2")}
    lines += ["", "checks: " + ", ".join(f"{k}={v}" for k, v in checks.items())]
    mem = res.get("weight_bytes", {})
    if mem:
        base = mem["bf16"]["bytes"]
        lines += ["", "| weights | MiB (all linears) | × smaller than bf16 | packed sites | packed MiB vs bf16 MiB |",
                  "|---|---|---|---|---|"]
        for k, v in mem.items():
            packed = (f"{v['lowered_bytes'] / 2**20:.1f} vs {v['lowered_dense_bytes'] / 2**20:.1f} "
                      f"({v['lowered_dense_bytes'] / v['lowered_bytes']:.2f}×)") if v["lowered_bytes"] else "-"
            lines.append(f"| {k} | {v['bytes'] / 2**20:.1f} | {base / v['bytes']:.2f} | {v['lowered_sites']} | {packed} |")
    prof = res.get("profile", {})
    if prof:
        cats = sorted({c for p in prof.values() for c in p["categories"]})
        lines += ["", "Per-kernel CUPTI time per step (ms), by category:", "",
                  "| step | " + " | ".join(cats) + " | total |", "|---|" + "---:|" * (len(cats) + 1)]
        for name, p in prof.items():
            vals = [p["categories"].get(c, 0.0) for c in cats]
            lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals):.2f} |")
        for name, p in prof.items():
            lines += ["", f"Top kernels of {name} (calls per step, ms per step):", ""]
            lines += [f"- {ms:.3f} ms, {calls:g} calls: `{kname[:90]}`" for kname, calls, ms in p["kernels"][:12]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
