"""The accuracy path on the GPU: calibration time and peak memory of the papers' recipes, the fake-quant CFG step
of every registered recipe against the bf16 step, and ``jdq eval --protocol dit-imagenet256`` throughput.

Run on a GPU: ``python benchmarks/paper_recipes_gpu.py --device-run --budget-s 540 --out $OUT``; on a CPU
``--tiny`` runs every stage on a tiny DiT (2 sampler steps, batch 2) as a smoke test. Random weights
(DiT-XL/2 256: speed and memory do not depend on the values). Stages, in order, each skipped when the
budget it needs is spent (the JSON then says ``skipped`` and why):

1. ``calibration``: each paper recipe (``ptq4dit``, ``q-dit``, ``tq-dit``, in that order; none starts
   after ``--calib-share`` of the budget) through :func:`jdq.recipes.quantize` along a real DDPM
   trajectory with classifier-free guidance, at the recipe's own calibration settings but with fewer samples and sampler steps (``--calib-samples``
   × ``--calib-steps``; recorded per recipe with the options used); wall time of calibration and of
   ``prepare`` (searches, GPTQ, folding), and the device's ``peak_bytes_in_use`` after it (process-wide and
   monotone: JAX has no peak reset, so a later recipe's peak is a maximum with the earlier ones; the
   calibrations run before anything at batch ``--batch`` so the model's sampling does not set it), RSS on a CPU;
2. ``steps``: one guided denoiser evaluation at batch ``--batch`` (``2 × batch`` model evaluations), compiled
   once and timed as the compiled function (median wall ms): bf16 first, then every recipe of
   :func:`jdq.recipes.names` (paper recipes with their calibrated state; other calibrated recipes with a
   one-sample calibration), with the ratio to bf16 (the goal: ≤ 1.5). The weights are quantized once
   before the step (:func:`jdq.quant.hoist.hoist_weights`), as the sampler does before its loop, so the
   time is a sampling step's; ``--per-step-weights`` times the step with the weight casts inside it
   (the rounds before 2026-12-02's third session). ``--profile NAMES`` adds a CUPTI per-kernel breakdown;
   ``--also-with ENV=VALUE`` (repeatable) times each recipe again per variant, compiled afresh with that variable
   set (row ``"<recipe> [ENV=VALUE]"``), e.g. ``JDQ_ACT_CAST=xla`` for an A/B of a kernel route in one call;
   several variables set together are one variant separated by spaces (``"JDQ_ROW_SELECT=kernel
   JDQ_QUANT_ATTENTION=kernel"``). ``--rounds R`` times every compiled step R times in turn (bf16, each
   recipe, each variant, then again), so a drift of the machine's speed during the run reaches every row
   alike; a row's time is the median of its rounds' medians;
3. ``eval``: ``jdq eval --protocol dit-imagenet256`` in process on random-weight DiT-XL/2 + SD VAE + FID
   Inception folders and a made-up reference batch, ``--eval-samples`` samples at ``--eval-steps`` DDPM
   steps (fewer when the budget is short), timed and extrapolated to the protocol's 10,000 × 250 steps.

Results go to ``paper_recipes_gpu.json`` / ``.md`` under ``--out`` (default ``$OUT``, else
``benchmarks/results/latest``), rewritten atomically after every stage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest")
PAPER_RECIPES = ("ptq4dit", "q-dit", "tq-dit")  # the order they run in: the cheapest first
GOAL_RATIO = 1.5
PROTOCOL_SAMPLES, PROTOCOL_STEPS = 10_000, 250
STAGES = ("calibration", "steps", "eval")


def write_atomic(path, text):
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def memory_now():
    """``{"peak_bytes", "in_use_bytes", "kind"}``: the device allocator's counters, else the process's peak RSS."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001  (backends without allocator statistics)
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_bytes": int(stats["peak_bytes_in_use"]), "in_use_bytes": int(stats.get("bytes_in_use", 0)),
                "kind": "device peak_bytes_in_use (process-wide)"}
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "in_use_bytes": None,
            "kind": "host peak RSS (process-wide)"}


def timed_ms(fn, args, iters):
    """Median wall milliseconds of the compiled ``fn(*args)`` (after one warm-up call)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


@contextlib.contextmanager
def environment(pairs):
    """The environment variables ``pairs`` ((name, value), ...) set inside the block, restored after it."""
    before = {env: os.environ.get(env) for env, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for env, value in before.items():
            if value is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = value


def more_rounds(b, st, timed):
    """Rounds 2… of ``--rounds``: every compiled step of ``timed`` again in turn; rows get the median of their rounds."""
    for r in range(1, b.args.rounds):
        if b.left() <= 0:
            b.log(f"rounds: budget spent after {r} of {b.args.rounds}")
            break
        for name, (step, args) in timed.items():
            st["times"][name]["rounds_ms"].append(timed_ms(step, args, b.args.iters))
        b.save()
    base = st["times"].get("bf16", {})
    for name in timed:
        rec = st["times"][name]
        rec["wall_ms"] = statistics.median(rec["rounds_ms"])
    for name in timed:
        rec = st["times"][name]
        if name != "bf16" and base.get("wall_ms"):
            rec["ratio_vs_bf16"] = rec["wall_ms"] / base["wall_ms"]
            rec["meets_goal"] = rec["ratio_vs_bf16"] <= GOAL_RATIO
        b.log(f"step {name:14s} {rec['wall_ms']:9.2f} ms, median of {len(rec['rounds_ms'])} rounds: "
              + ", ".join(f"{v:.2f}" for v in rec["rounds_ms"]))


def build_model(tiny):
    """The random-weight DiT (XL/2 256, or a tiny one) in bfloat16."""
    from jdq.models import dit

    if tiny:
        cfg = dit.Config(input_size=8, patch_size=2, hidden_size=128, depth=2, num_heads=2, num_classes=10,
                         dtype="bfloat16")
    else:
        cfg = dit.Config.variant("XL/2", 256, dtype="bfloat16")
    return dit.from_config(cfg, key=0).astype(jnp.bfloat16)


class Bench:
    """The run's state: arguments, the budget clock, the results and their atomic writer."""

    def __init__(self, args, out_dir):
        self.args, self.out_dir, self.t0 = args, out_dir, time.time()
        self.res = {"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                    "tiny": bool(args.tiny), "budget_s": args.budget_s, "batch": args.batch,
                    "stages": {s: {"status": "pending"} for s in STAGES}}

    def elapsed(self):
        """Seconds since the run started."""
        return time.time() - self.t0

    def left(self):
        """Seconds of budget left."""
        return self.args.budget_s - self.elapsed()

    def save(self):
        """Rewrite the JSON and the markdown (atomically)."""
        self.res["seconds"] = self.elapsed()
        write_atomic(os.path.join(self.out_dir, "paper_recipes_gpu.json"), json.dumps(self.res, indent=1, default=str))
        write_atomic(os.path.join(self.out_dir, "paper_recipes_gpu.md"), render_markdown(self.res))

    def log(self, msg):
        """Print ``msg`` with the elapsed time."""
        print(f"[{self.elapsed():6.0f}s] {msg}", flush=True)


def calibration_stage(b, model, sampler, labels, guidance):
    """Stage 1: each paper recipe through ``jdq.recipes.quantize``; returns {name: Quantized} of those done."""
    from jdq import recipes

    st = b.res["stages"]["calibration"]
    st.update(status="running", sampler=f"{sampler.kind} {sampler.num_steps} steps", guidance=guidance,
              samples=b.args.calib_samples, recipes={})
    st["memory_before"] = memory_now()
    done = {}
    for name in b.calib_recipes:
        if name not in recipes.names():
            st["recipes"][name] = {"status": "skipped", "reason": "not registered"}
            continue
        if b.elapsed() > b.args.budget_s * b.args.calib_share:  # the steps and eval stages need the rest
            st["recipes"][name] = {"status": "skipped", "reason": f"budget: {b.left():.0f}s left"}
            b.log(f"skipping calibration of {name}: budget")
            b.save()
            continue
        opts = {"search_points": b.args.calib_samples} if name == "tq-dit" else {}
        rec = st["recipes"][name] = {"status": "running", "options_overridden": opts}
        b.save()
        b.log(f"calibrating {name}: {b.args.calib_samples} samples x {sampler.num_steps} {sampler.kind} steps")
        t0 = time.perf_counter()
        try:
            q = recipes.quantize(model, name, sampler=sampler, cond=labels, guidance=guidance, seed=0,
                                 calib_samples=b.args.calib_samples, **opts)
            jax.block_until_ready(jax.tree.leaves((q.quantizer, q.params)))
        except Exception as e:  # noqa: BLE001  (one recipe failing must not end the run)
            rec.update(status="failed", error=f"{type(e).__name__}: {str(e)[:400]}")
            b.log(f"FAILED {name}: {rec['error']}")
            b.save()
            continue
        total = time.perf_counter() - t0
        cal = q.info.get("calibration") or {}
        rec.update(status="done", total_s=total, calibration_s=float(q.info.get("calibration_s", 0.0)),
                   prepare_s=float(q.info.get("prepare_s", 0.0)), calibration=cal, memory=memory_now(),
                   options={k: v for k, v in q.info["options"].items() if k != "group_sizes"},
                   ran=f"{cal.get('samples', b.args.calib_samples)} samples x {sampler.num_steps} {sampler.kind} steps "
                       f"(steps used: {cal.get('steps', '?')}), guidance {guidance:g}")
        done[name] = q
        b.log(f"{name}: calibration {rec['calibration_s']:.1f}s, prepare {rec['prepare_s']:.1f}s, "
              f"peak {rec['memory']['peak_bytes'] / 2**30:.2f} GiB")
        b.save()
    st["status"] = "done"
    b.save()
    return done


def kernel_profile(fn, args, top=60):
    """CUPTI per-kernel times of ``fn(*args)`` per call (``benchmarks/e2e.py``'s breakdown): {"top", "total_ms", "kernels"}."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("jdq_benchmark_e2e", os.path.join(os.path.dirname(__file__), "e2e.py"))
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    rows = e2e.kernel_breakdown(fn, args)["kernels"]  # [[name, calls, ms]...], slowest first
    return {"top": [[n[:120], c, ms] for n, c, ms in rows[:top]], "total_ms": sum(r[2] for r in rows), "kernels": len(rows)}


def write_optimized_hlo(fn, args, out_dir, name):
    """Write the compiled ``fn(*args)``'s optimized HLO (fusion names as the profile shows them), gzipped; returns the path."""
    import gzip

    path = os.path.join(out_dir, f"step_{name}.hlo.txt.gz")
    with gzip.open(path, "wt") as f:
        f.write(fn.lower(*args).compile().as_text())
    return path


def steps_stage(b, model, sampler, labels, guidance, calibrated):
    """Stage 2: the guided denoiser step at batch ``--batch``: bf16, then every recipe's fake-quant step."""
    from jdq import recipes
    from jdq.quant.hoist import hoist_weights
    from jdq.sampling import loop
    from jdq.sampling.generate import Denoiser, guided_channels, null_condition, sample_shape

    st = b.res["stages"]["steps"]
    st.update(status="running", times={}, evaluations_per_step=2 * b.args.batch,
              weights="cast inside the step" if b.args.per_step_weights else "hoisted (quantized once, as the sampler does)")
    profiled = {r for r in b.args.profile.split(",") if r}
    fn = Denoiser(model, model.family)
    bsz, n = b.args.batch, sampler.num_steps
    k1, k2 = jax.random.split(jax.random.key(1))
    x = jax.random.normal(k1, (bsz,) + sample_shape(model), jnp.float32)
    y = jax.random.randint(k2, (bsz,), 0, model.config.num_classes)
    t = jnp.full((bsz,), float(sampler.model_timesteps(n // 2)), jnp.float32)
    i = jnp.asarray(n // 2, jnp.int32)
    unc = null_condition(model, y)
    gch = guided_channels(model)

    def step_fn(params, quant, x, t, y, i):
        return loop.guided_output(fn, params, x, t, y, unc, guidance, quant=loop.at_step(quant, i, n),
                                  guided_channels=gch)

    step = jax.jit(step_fn)
    timed = {}  # name -> (compiled step, its arguments): what later rounds time again

    def run(name, params, quant):
        for pairs in b.args.also_with if name != "bf16" else ():
            # first each variant's row, compiled afresh: a route is chosen when tracing
            with environment(pairs):
                label = " ".join(f"{env}={value}" for env, value in pairs)
                _run(f"{name} [{label}]", params, quant, jax.jit(lambda *a: step_fn(*a)))
        return _run(name, params, quant, step)

    def _run(name, params, quant, step):
        t0 = time.perf_counter()
        try:
            out = jax.block_until_ready(step(params, quant, x, t, y, i))
            compile_s = time.perf_counter() - t0
            ms = timed_ms(step, (params, quant, x, t, y, i), b.args.iters)
        except Exception as e:  # noqa: BLE001
            st["times"][name] = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:400]}"}
            b.log(f"FAILED step {name}: {st['times'][name]['error']}")
            return None
        rec = st["times"][name] = {"status": "done", "wall_ms": ms, "compile_s": compile_s,
                                   "finite": bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))}
        if b.args.rounds > 1:
            rec["rounds_ms"] = [ms]
            timed[name] = (step, (params, quant, x, t, y, i))
        if name in profiled and jax.default_backend() == "gpu":
            try:
                rec["profile"] = kernel_profile(step, (params, quant, x, t, y, i))
                b.log(f"  profile {name}: {rec['profile']['kernels']} kernels, {rec['profile']['total_ms']:.2f} ms; top: "
                      + "; ".join(f"{n[:60]} {ms:.2f}" for n, _, ms in rec["profile"]["top"][:6]))
            except Exception as e:  # noqa: BLE001
                rec["profile"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            if b.args.hlo:
                rec["hlo"] = write_optimized_hlo(step, (params, quant, x, t, y, i), b.out_dir, name)
        base = st["times"].get("bf16", {}).get("wall_ms")
        if base and name != "bf16":
            rec["ratio_vs_bf16"] = ms / base
            rec["meets_goal"] = rec["ratio_vs_bf16"] <= GOAL_RATIO
        b.log(f"step {name:14s} {ms:9.2f} ms" + (f"  x{rec['ratio_vs_bf16']:.2f} bf16" if "ratio_vs_bf16" in rec else ""))
        return out

    run("bf16", model.params, None)
    b.save()
    per = 0.0
    order = [n for n in b.calib_recipes if n in b.step_recipes] + [n for n in b.step_recipes if n not in b.calib_recipes]
    for name in order:  # the paper recipes first
        if b.left() < per * 1.2 + b.args.eval_reserve_s * (not b.args.skip_eval):
            st["times"][name] = {"status": "skipped", "reason": f"budget: {b.left():.0f}s left"}
            b.log(f"skipping step {name}: budget")
            continue
        t0 = time.perf_counter()
        try:
            if name in calibrated:
                q = calibrated[name]
            else:  # speed does not depend on the statistics: a one-sample calibration (same sampler: time groups)
                opts = {"search_points": 1} if "search_points" in recipes.get(name).options else {}
                q = recipes.quantize(model, name, sampler=sampler, cond=labels, guidance=guidance, calib_samples=1,
                                     **opts)
        except Exception as e:  # noqa: BLE001
            st["times"][name] = {"status": "failed", "error": f"quantize: {type(e).__name__}: {str(e)[:400]}"}
            b.log(f"FAILED quantize {name}: {st['times'][name]['error']}")
            b.save()
            continue
        quant = q.quantizer
        if not b.args.per_step_weights:  # what the sampler does before its loop (the same values)
            quant = hoist_weights(fn, q.params, x[:1], t[:1], y[:1], quant, n)
        run(name, q.params, quant)
        if name in st["times"]:
            st["times"][name]["state_from"] = "stage 1 calibration" if name in calibrated else (
                "1-sample calibration" if recipes.get(name).calibrated else "no calibration")
        if name in st["times"] and st["times"][name].get("status") == "done":
            st["times"][name]["setup_s"] = time.perf_counter() - t0 - st["times"][name]["compile_s"]
        per = max(per, time.perf_counter() - t0)
        b.save()
    more_rounds(b, st, timed)
    ratios = {k: v["ratio_vs_bf16"] for k, v in st["times"].items() if "ratio_vs_bf16" in v}
    if ratios:
        worst = max(ratios, key=ratios.get)
        st["worst"] = {"recipe": worst, "ratio_vs_bf16": ratios[worst]}
        st["all_meet_goal"] = all(r <= GOAL_RATIO for r in ratios.values())
    st["status"] = "done"
    b.save()


def eval_stage(b, model, step_ms):
    """Stage 3: ``jdq eval --protocol dit-imagenet256`` in process on saved random-weight folders, timed."""
    import warnings

    from jdq import cli
    from jdq.models import base, inception, vae

    st = b.res["stages"]["eval"]
    tiny = b.args.tiny
    groups = 4 if tiny else 10
    n, steps = b.args.eval_samples, b.args.eval_steps
    if b.left() <= 0:
        st.update(status="skipped", reason=f"budget: {b.left():.0f}s left")
        b.save()
        return
    if step_ms and not tiny:  # shrink to fit: the sampling costs about n/batch * steps bf16 steps (plus the FP32 VAE etc.)
        per_sample_step_s = step_ms / 1e3 / b.args.batch
        fit = max(0.0, b.left() - 90.0) / 1.5  # folders, compile, VAE, Inception and metrics take the rest
        while n * steps * per_sample_step_s > fit and steps > 10:
            steps = max(10, steps // 2)
        while n * steps * per_sample_step_s > fit and n > 4 * groups:
            n = max(2 * groups, n // 2)
        if n * steps * per_sample_step_s > fit:
            st.update(status="skipped", reason=f"budget: {b.left():.0f}s left")
            b.save()
            return
    st.update(status="running", samples=n, steps=steps, batch_size=b.args.eval_batch)
    b.save()
    with tempfile.TemporaryDirectory(prefix="jdq_eval_bench_") as root:
        t0 = time.perf_counter()
        base.save(model, os.path.join(root, "dit"))
        vcfg = vae.Config(block_out_channels=(32, 32), norm_num_groups=8) if tiny else vae.Config()
        base.save(vae.from_config(vcfg, key=2), os.path.join(root, "vae"))
        base.save(inception.from_config(inception.Config(input_size=75 if tiny else 299), key=1),
                  os.path.join(root, "inception"))
        side = model.config.input_size * 2 ** (len(vcfg.block_out_channels) - 1)
        rng = np.random.default_rng(0)
        np.savez(os.path.join(root, "ref.npz"), arr_0=rng.integers(0, 256, (b.args.eval_ref, side, side, 3), np.uint8))
        st["folders_s"] = time.perf_counter() - t0
        argv = ["eval", os.path.join(root, "dit"), "--protocol", "dit-imagenet256",
                "--inception", os.path.join(root, "inception"), "--vae", os.path.join(root, "vae"),
                "--reference", os.path.join(root, "ref.npz"), "--samples", str(n), "--steps", str(steps),
                "--batch-size", str(b.args.eval_batch), "--groups", str(groups), "--out", os.path.join(root, "run"),
                "--no-progress"]
        st["argv"] = " ".join(argv[:1] + ["DIT"] + argv[2:]).replace(root, "TMP")
        b.log(f"jdq eval: {n} samples x {steps} DDPM steps")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few samples of 2048-wide features: rank-deficient covariances
            code = cli.main(argv)
        wall = time.perf_counter() - t0
        st.update(exit_code=code, wall_s=wall)
        path = os.path.join(root, "run", "results.json")
        if code != 0 or not os.path.isfile(path):
            st.update(status="failed", error=f"jdq eval exited {code}")
            b.save()
            return
        with open(path) as f:
            out = json.load(f)
        timing = out.get("timing", {})
        samp = float(timing.get("sampling_s", wall))
        st.update(status="done", timing=timing, metrics={k: v.get("value") for k, v in out.get("metrics", {}).items()},
                  samples_per_s=n / samp,
                  # linear in samples and steps; the sampling time includes one compile (an upper bound)
                  extrapolated_10k_250_steps_s=samp * (PROTOCOL_SAMPLES / n) * (PROTOCOL_STEPS / steps))
    b.log(f"eval: {wall:.1f}s total, sampling {samp:.1f}s -> 10k x 250 steps ~ {st['extrapolated_10k_250_steps_s'] / 3600:.2f} h")
    b.save()


def render_markdown(res):
    """The three stages as tables."""
    gib = lambda v: "-" if v is None else f"{v / 2**30:.2f}"  # noqa: E731
    lines = [f"jax {res['jax']}, {res['device']} ({res['backend']}){' — tiny DiT' if res['tiny'] else ' — DiT-XL/2 256'}, "
             f"budget {res['budget_s']:.0f}s, {res.get('seconds', 0):.0f}s used", ""]
    cal = res["stages"]["calibration"]
    lines += [f"## Calibration ({cal.get('sampler', '-')}, guidance {cal.get('guidance', '-')}): {cal['status']}", "",
              "| recipe | ran | calibration s | prepare s | peak GiB | status |", "|---|---|---:|---:|---:|---|"]
    for name, r in cal.get("recipes", {}).items():
        mem = r.get("memory", {})
        lines.append(f"| {name} | {r.get('ran', '-')} | {r.get('calibration_s', float('nan')):.1f} | "
                     f"{r.get('prepare_s', float('nan')):.1f} | {gib(mem.get('peak_bytes'))} | "
                     f"{r['status']} {r.get('reason', r.get('error', ''))[:80]} |")
    if cal.get("recipes"):
        kind = next((r["memory"]["kind"] for r in cal["recipes"].values() if "memory" in r), "")
        lines += ["", f"peak: {kind}; monotone over the run (before: {gib(cal.get('memory_before', {}).get('peak_bytes'))} GiB)"]
    stp = res["stages"]["steps"]
    lines += ["", f"## CFG step at batch {res['batch']} ({2 * res['batch']} evaluations): {stp['status']}", "",
              f"weights: {stp.get('weights', '-')}", "",
              f"| step | wall ms | × bf16 (goal ≤ {GOAL_RATIO}) | compile s | status |", "|---|---:|---:|---:|---|"]
    for name, r in stp.get("times", {}).items():
        ratio = f"{r['ratio_vs_bf16']:.2f}" if "ratio_vs_bf16" in r else "-"
        ms = f"{r['wall_ms']:.2f}" if "wall_ms" in r else "-"
        cs = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        lines.append(f"| {name} | {ms} | {ratio} | {cs} | {r['status']} {r.get('reason', r.get('error', ''))[:80]} |")
    if "worst" in stp:
        lines += ["", f"worst: {stp['worst']['recipe']} ×{stp['worst']['ratio_vs_bf16']:.2f}; all meet the goal: "
                      f"{stp['all_meet_goal']}"]
    ev = res["stages"]["eval"]
    lines += ["", f"## jdq eval --protocol dit-imagenet256: {ev['status']} {ev.get('reason', ev.get('error', ''))}"]
    if ev["status"] == "done":
        lines += ["", f"{ev['samples']} samples × {ev['steps']} DDPM steps (batch {ev['batch_size']}): {ev['wall_s']:.1f}s "
                      f"total, sampling {ev['timing'].get('sampling_s', float('nan')):.1f}s (incl. compile), metrics "
                      f"{ev['timing'].get('metrics_s', float('nan')):.1f}s; {ev['samples_per_s']:.2f} samples/s; "
                      f"extrapolated to 10,000 × 250 steps: {ev['extrapolated_10k_250_steps_s'] / 3600:.2f} h",
                  "", f"command: `jdq {ev['argv']}`"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-run", action="store_true", help="the GPU run (DiT-XL/2 256)")
    p.add_argument("--tiny", action="store_true", help="a tiny DiT, 2 steps, batch 2 (the CPU smoke test)")
    p.add_argument("--out", default=None, help="folder for results (default $OUT, else benchmarks/results/latest)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip stages that would run past this")
    p.add_argument("--batch", type=int, default=None, help="CFG step batch (default 32; --tiny 2)")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions per step (default 10; --tiny 2)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration samples (default 8; --tiny 2)")
    p.add_argument("--calib-steps", type=int, default=None, help="DDPM steps of the calibration sampler (default 25; --tiny 2)")
    p.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance of calibration and steps")
    p.add_argument("--eval-samples", type=int, default=None, help="jdq eval samples (default 512; --tiny 8)")
    p.add_argument("--eval-steps", type=int, default=None, help="jdq eval DDPM steps (default 250; --tiny 2)")
    p.add_argument("--eval-batch", type=int, default=None, help="jdq eval --batch-size (default 64; --tiny 8)")
    p.add_argument("--eval-ref", type=int, default=None, help="made-up reference images (default 64; --tiny 8)")
    p.add_argument("--eval-reserve-s", type=float, default=120.0, help="budget kept for the eval stage")
    p.add_argument("--calib-share", type=float, default=0.3, help="no calibration starts after this share of the budget")
    p.add_argument("--skip-eval", action="store_true", help="leave out the jdq eval stage")
    p.add_argument("--calib-recipes", default=",".join(PAPER_RECIPES), help="recipes calibrated in stage 1 (comma list)")
    p.add_argument("--recipes", default="all", help="recipes whose step stage 2 times ('all': every registered one)")
    p.add_argument("--per-step-weights", action="store_true",
                   help="time steps with the weight casts inside them (default: hoisted, as sampling runs)")
    p.add_argument("--profile", default="", help="recipes (and 'bf16') whose step gets a CUPTI per-kernel breakdown")
    p.add_argument("--hlo", action="store_true", help="also write each profiled step's optimized HLO (gzipped text)")
    p.add_argument("--rounds", type=int, default=1, help="time every compiled step this many times in turn "
                   "(a row: the median of its rounds)")
    p.add_argument("--also-with", action="append", default=[], metavar="ENV=VALUE",
                   help="time every recipe's step again with this environment variable set, e.g. JDQ_ACT_CAST=xla "
                        "(an A/B of a kernel route against the same bf16 step); repeat for several variants")
    args = p.parse_args(argv)
    variants = []
    for spec in args.also_with:
        pairs = []
        for item in spec.split() or [spec]:
            env, sep, value = item.partition("=")
            if not sep or not env:
                raise SystemExit(f"--also-with wants ENV=VALUE (several separated by spaces), got {spec!r}")
            pairs.append((env, value))
        variants.append(tuple(pairs))
    args.also_with = variants
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    on_gpu = jax.default_backend() == "gpu"
    if args.device_run and not on_gpu and not args.tiny:
        raise SystemExit("--device-run needs a GPU (use --tiny on a CPU)")
    if not args.device_run and not args.tiny:
        raise SystemExit("give --device-run (GPU, DiT-XL/2) or --tiny (a tiny DiT)")
    tiny = args.tiny
    for k, full, small in (("batch", 32, 2), ("iters", 10, 2), ("calib_samples", 8, 2), ("calib_steps", 25, 2),
                           ("eval_samples", 512, 8), ("eval_steps", 250, 2), ("eval_batch", 64, 8), ("eval_ref", 64, 8)):
        if getattr(args, k) is None:
            setattr(args, k, small if tiny else full)
        if getattr(args, k) < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1")
    if tiny:
        args.eval_reserve_s = 0.0
    out_dir = args.out or os.environ.get("OUT") or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    from jdq.sampling import samplers

    from jdq import recipes

    b = Bench(args, out_dir)
    b.calib_recipes = [r for r in args.calib_recipes.split(",") if r]
    b.step_recipes = list(recipes.names()) if args.recipes == "all" else [r for r in args.recipes.split(",") if r]
    for r in b.calib_recipes + b.step_recipes:
        if r not in recipes.names():
            raise SystemExit(f"unknown recipe {r!r}; known: {', '.join(recipes.names())}")
    model = build_model(tiny)
    cfg = model.config
    b.res["model"] = {"hidden_size": cfg.hidden_size, "depth": cfg.depth, "input_size": cfg.input_size,
                      "patch_size": cfg.patch_size, "dtype": "bfloat16 (params and compute)"}
    b.log(f"jax {jax.__version__} {b.res['device']}: DiT hidden {cfg.hidden_size} depth {cfg.depth}, batch {args.batch}")
    b.save()
    sampler = samplers.ddpm(args.calib_steps)
    labels = np.arange(max(args.calib_samples, 1), dtype=np.int32) % cfg.num_classes
    calibrated = calibration_stage(b, model, sampler, labels, args.guidance)
    steps_stage(b, model, sampler, labels, args.guidance, calibrated)
    calibrated.clear()
    if args.skip_eval:
        b.res["stages"]["eval"].update(status="skipped", reason="--skip-eval")
    else:
        try:
            eval_stage(b, model, b.res["stages"]["steps"].get("times", {}).get("bf16", {}).get("wall_ms"))
        except Exception as e:  # noqa: BLE001  (keep the stages already done)
            b.res["stages"]["eval"].update(status="failed", error=f"{type(e).__name__}: {str(e)[:400]}")
            b.log(f"FAILED eval: {b.res['stages']['eval']['error']}")
    b.save()
    print("\n" + render_markdown(b.res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
