"""Kernel speed: jdq's Pallas GEMMs against XLA's bf16, int8 and fp8 dots, measured in one run.

Run on a GPU: ``python benchmarks/kernels.py --device-run [--out DIR]``. On a CPU (no GPU) it
runs a tiny smoke version (interpret mode) that checks the script end to end.

Times are the median over ``--iters`` CUPTI-measured iterations (``jax.experimental.mosaic.gpu
.profiler.measure``: summed kernel time, no launch gaps); each iteration runs the op on
``--rotate`` independent input sets (weights and activations) so that repeated runs do not hit in
the L2 cache. Before timing, every jdq kernel is checked against its reference on the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

DIT_LAYERS = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
DIT_BATCHES = (1, 2, 4, 8, 16, 32, 64)
PIXART_TOKENS = 4096


def shapes(kind="dit", batches=DIT_BATCHES):
    """(label, M, K, N) of the benchmark shapes."""
    out = []
    if kind in ("dit", "all"):
        for bsz in batches:
            for name, (k, n) in DIT_LAYERS.items():
                out.append((f"dit.{name}.b{bsz}", 256 * bsz, k, n))
    if kind in ("pixart", "all"):
        for name, (k, n) in DIT_LAYERS.items():
            out.append((f"pixart.{name}.b1", PIXART_TOKENS, k, n))
    return out


# ------------------------------------------------------------------------------------ timing


def _measure_fn():
    try:
        from jax.experimental.mosaic.gpu import profiler

        return profiler.measure
    except Exception:  # noqa: BLE001
        return None


def time_ms(fn, sets, iters=10):
    """Median milliseconds of one ``fn(*args)`` call, averaged over the input ``sets``."""
    g = jax.jit(lambda ss: [fn(*a) for a in ss])
    measure = _measure_fn()
    if measure is not None and jax.default_backend() == "gpu":
        try:
            _, ts = measure(g, iterations=iters)(sets)
            if ts:
                return statistics.median(ts) / len(sets)
        except Exception as e:  # noqa: BLE001
            print("  (cupti measure failed, using wall clock:", type(e).__name__, str(e)[:100], ")")
    jax.block_until_ready(g(sets))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(g(sets))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts) / len(sets)


# ------------------------------------------------------------------------------------ inputs


def make_w8a8_inputs(key, m, k, n, rotate):
    """``rotate`` independent (x bf16, wq (N,K) int8, ws, b) sets (random, never zero)."""
    from jdq.kernels.w8a8.ref import quantize_per_channel

    sets = []
    for i in range(rotate):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        x = (jax.random.normal(k1, (m, k), jnp.float32) * 2).astype(jnp.bfloat16)
        w = jax.random.normal(k2, (n, k), jnp.float32) / np.sqrt(k)
        wq, ws = quantize_per_channel(w, axis=-1)
        b = jax.random.normal(k3, (n,), jnp.float32) * 0.1
        sets.append((x, wq, ws, b))
    return sets


def baselines(sets):
    """XLA reference ops on the same shapes: bf16 dot, int8 dot, fp8 dot, W8A8 through XLA."""
    from jdq.kernels.w8a8 import ref

    bf = [(x, (wq.astype(jnp.float32) * ws[:, None]).T.astype(jnp.bfloat16)) for x, wq, ws, b in sets]
    i8 = [(ref.quantize_per_token(x)[0], wq) for x, wq, ws, b in sets]
    f8 = [(x.astype(jnp.float8_e4m3fn), wq.astype(jnp.float8_e4m3fn)) for x, wq, ws, b in sets]
    return {
        "xla_bf16": (lambda x, w: jnp.dot(x, w), bf),
        "xla_int8": (lambda a, w: lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32), i8),
        "xla_fp8": (lambda a, w: lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16), f8),
        "xla_w8a8": (lambda x, wq, ws, b: ref.w8a8_linear(x, wq, ws, b), sets),
    }


# ------------------------------------------------------------------------------------ checks


def check_w8a8(cfg, m, k, n, interpret=False):
    """(exact, relerr): exactness with power-of-two scales, and relative error with random scales."""
    from jdq.kernels.w8a8 import ref
    from jdq.kernels.w8a8.gpu import w8a8_matmul_gpu

    key = jax.random.key(m * 7 + n)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    xq = jax.random.randint(k1, (m, k), -127, 128, jnp.int8)
    wq = jax.random.randint(k2, (n, k), -127, 128, jnp.int8)
    xs = 2.0 ** jax.random.randint(k3, (m,), -12, -4).astype(jnp.float32)
    ws = 2.0 ** jax.random.randint(k4, (n,), -12, -4).astype(jnp.float32)
    b = jnp.round(jax.random.normal(k4, (n,)) * 64) / 64
    out = w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.float32, cfg, interpret=interpret)
    want = ref.w8a8_matmul(xq, xs, wq, ws, b, jnp.float32)
    exact = bool(jnp.all(out == want))
    xs2 = jax.random.uniform(k3, (m,), jnp.float32, 1e-3, 2e-2)
    ws2 = jax.random.uniform(k4, (n,), jnp.float32, 1e-3, 2e-2)
    o2 = w8a8_matmul_gpu(xq, xs2, wq, ws2, b, jnp.bfloat16, cfg, interpret=interpret).astype(jnp.float32)
    r2 = ref.w8a8_matmul(xq, xs2, wq, ws2, b, jnp.float32)
    rel = float(jnp.linalg.norm(o2 - r2) / jnp.linalg.norm(r2))
    if not bool(jnp.all(jnp.isfinite(o2))):
        rel = float("nan")
    return exact, rel


# ------------------------------------------------------------------------------------ main


def w8a8_candidates(num_sms):
    """Configs tried by the W8A8 tuning sweep."""
    from jdq.kernels.w8a8.gpu import Config

    c = []
    for st in (2, 3, 4):
        c.append(Config("pipe", 128, 128, 128, st))
    c.append(Config("pipe", 128, 128, 128, 3, wgmma_wait=1))
    c.append(Config("pipe", 64, 128, 128, 3))
    c.append(Config("pipe", 128, 64, 128, 4))
    for st in (3, 4):
        c.append(Config("ws", 128, 128, 128, st, wg_dim="m", num_sms=num_sms))
    c.append(Config("ws", 128, 128, 64, 8, wg_dim="m", num_sms=num_sms))
    c.append(Config("ws", 128, 128, 128, 4, wg_dim="m", num_sms=num_sms, grid_minor="m"))
    c.append(Config("ws", 128, 64, 128, 4, wg_dim="n", num_sms=num_sms))
    c.append(Config("ws", 64, 128, 128, 4, wg_dim="m", num_sms=num_sms))
    c.append(Config("ws", 128, 128, 64, 6, wg_dim="m", num_sms=num_sms))
    return c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-run", action="store_true", help="full run on a GPU")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON results")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rotate", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=400.0, help="stop starting new work after this long")
    p.add_argument("--tune-batches", default="16,64")
    p.add_argument("--ops", default="w8a8,wo", help="comma list: w8a8 (W8A8 table), wo (weight-only table)")
    p.add_argument("--skip-tune", action="store_true", help="use the tuning table instead of sweeping configs")
    p.add_argument("--table-batches", default="1,2,4,8,16,32,64")
    p.add_argument("--wo-batches", default="1,2,4")
    args = p.parse_args(argv)
    t_start = time.time()
    results = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": [], "tune": [], "checks": []}
    print(f"jax {jax.__version__}  device {results['device']}  backend {jax.default_backend()}", flush=True)
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and args.device_run:
        raise SystemExit("--device-run needs a GPU")
    from jdq.kernels._mgpu import num_sms

    nsm = num_sms()
    out_path = os.path.join(args.out, "kernels.json")

    def save():
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=str)
        os.replace(tmp, out_path)

    key = jax.random.key(0)
    if not on_gpu:  # CPU smoke: interpret-mode correctness at a tiny shape, XLA timing only
        from jdq.kernels.w8a8.gpu import Config

        ex, rel = check_w8a8(Config("pipe", 64, 64, 128, 2), 128, 256, 128, interpret=True)
        print(f"smoke: w8a8 pipe interpret exact={ex} relerr={rel:.2e}")
        sets = make_w8a8_inputs(key, 256, 256, 256, 2)
        for name, (fn, ss) in baselines(sets).items():
            print(f"smoke: {name} {time_ms(fn, ss, 3):.3f} ms")
        args.rotate, args.iters = 1, 1
        weight_only_table(results, key, [], args, t_start, lambda: None, [("tiny", 64, 256, 128)], interpret=True)
        print_wo_table(results)
        return 0

    from jdq.kernels.w8a8.gpu import w8a8_matmul_gpu
    from jdq.kernels.w8a8.ref import quantize_per_token

    from jdq.kernels import tuning
    from jdq.kernels.w8a8.gpu import Config

    cands = [Config(**tuning.lookup("w8a8", 4096))] if args.skip_tune else w8a8_candidates(nsm)
    ops = args.ops.split(",")
    # 1. correctness of every candidate on the device, before any timing
    ok = []
    for cfg in cands:
        try:
            ex, rel = check_w8a8(cfg, 1024, 1152, 1536)
            good = ex and rel < 1e-2
            results["checks"].append({"config": dataclasses.asdict(cfg), "exact": ex, "relerr": rel})
            print(f"check {cfg.kind} {cfg.tile_m}x{cfg.tile_n}x{cfg.tile_k} st{cfg.stages} {cfg.wg_dim} {cfg.grid_minor} w{cfg.wgmma_wait}: exact={ex} relerr={rel:.2e}", flush=True)
            if good:
                ok.append(cfg)
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e)[:300]}"
            results["checks"].append({"config": dataclasses.asdict(cfg), "error": msg})
            print(f"check {cfg} FAILED {msg}", flush=True)
            if not any("error" in c for c in results["checks"][:-1]):
                print(traceback.format_exc()[-2500:], flush=True)
    save()

    # 2. tune: every passing candidate on the tuning shapes
    tune_b = [] if args.skip_tune else [int(b) for b in args.tune_batches.split(",")]
    best = {}
    for label, m, k, n in shapes("dit", tune_b):
        if time.time() - t_start > args.budget_s * 0.5:
            print("tuning budget reached", flush=True)
            break
        sets = make_w8a8_inputs(key, m, k, n, args.rotate)
        qsets = [quantize_per_token(x) + (wq, ws, b) for x, wq, ws, b in sets]
        for cfg in ok:
            if not cfg.supports(m, n, k):
                continue
            try:
                t = time_ms(lambda xq, xs, wq, ws, b, cfg=cfg: w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.bfloat16, cfg), qsets, args.iters)
            except Exception as e:  # noqa: BLE001
                print(f"  tune {label} {cfg.kind} failed: {type(e).__name__} {str(e)[:200]}", flush=True)
                continue
            tops = 2 * m * n * k / t / 1e9
            results["tune"].append({"shape": label, "m": m, "k": k, "n": n, "config": dataclasses.asdict(cfg), "ms": t, "tops": tops})
            print(f"  tune {label:16s} {cfg.kind} {cfg.tile_m}x{cfg.tile_n}x{cfg.tile_k} st{cfg.stages} {cfg.wg_dim}{cfg.grid_minor} w{cfg.wgmma_wait}: {t*1e3:8.1f} us {tops:6.0f} TOP/s", flush=True)
            if label not in best or t < best[label][1]:
                best[label] = (cfg, t)
        save()
    # per-config total over tuning shapes -> one global best
    totals = {}
    for r in results["tune"]:
        key_c = json.dumps(r["config"], sort_keys=True)
        totals.setdefault(key_c, {}).update({r["shape"]: r["ms"]})
    nshapes = max((len(v) for v in totals.values()), default=0)
    full = {c: sum(v.values()) for c, v in totals.items() if len(v) == nshapes}
    glob = Config(**json.loads(min(full, key=full.get))) if full else (ok[0] if ok else None)
    if "w8a8" not in ops:
        glob = None
    results["best_config"] = None if glob is None else dataclasses.asdict(glob)
    print("best config:", glob, flush=True)

    # 3. the table: baselines and the best config on every shape
    table_b = [int(b) for b in args.table_batches.split(",")]
    w8_shapes = shapes("dit", table_b) + shapes("pixart") if "w8a8" in ops else []
    for label, m, k, n in w8_shapes:
        if time.time() - t_start > args.budget_s:
            print("budget reached", flush=True)
            break
        sets = make_w8a8_inputs(key, m, k, n, args.rotate)
        row = {"shape": label, "m": m, "k": k, "n": n}
        for name, (fn, ss) in baselines(sets).items():
            try:
                row[name] = time_ms(fn, ss, args.iters)
            except Exception as e:  # noqa: BLE001
                row[name] = None
                print(f"  {name} failed: {type(e).__name__} {str(e)[:200]}")
        if glob is not None and glob.supports(m, n, k):
            qsets = [quantize_per_token(x) + (wq, ws, b) for x, wq, ws, b in sets]
            row["w8a8_gemm"] = time_ms(lambda xq, xs, wq, ws, b: w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.bfloat16, glob), qsets, args.iters)
            row["w8a8_linear"] = time_ms(
                lambda x, wq, ws, b: w8a8_matmul_gpu(*quantize_per_token(x), wq, ws, b, jnp.bfloat16, glob), sets, args.iters
            )
        results["rows"].append(row)
        save()
        fl = 2 * m * n * k
        cells = "  ".join(f"{c}={fl / row[c] / 1e9:6.0f}" for c in row if c not in ("shape", "m", "k", "n") and row[c])
        print(f"{label:18s} TFLOP/s: {cells}", flush=True)
    if "wo" in ops:
        weight_only_table(results, key, [int(b) for b in args.wo_batches.split(",")], args, t_start, save)
    print_table(results)
    print_wo_table(results)
    return 0


def weight_only_table(results, key, batches, args, t_start, save, shape_list=None, interpret=False):
    """W8A16 / W4A16 kernels vs XLA bf16 dot and XLA dequantize-then-dot, with a device check first."""
    from jdq.kernels.weight_only import ref as wref
    from jdq.kernels.weight_only.gpu import Config, weight_only_matmul_gpu

    cfg = Config()
    variants = [("w8a16", 8, None), ("w4a16_ch", 4, None), ("w4a16_g128", 4, 128)]
    results["wo_rows"] = []
    results["wo_checks"] = []
    for label, m, k, n in shape_list or shapes("dit", batches):
        if time.time() - t_start > args.budget_s:
            print("budget reached (weight-only)", flush=True)
            break
        row = {"shape": label, "m": m, "k": k, "n": n}
        xs_, ws_ = [], []
        for i in range(args.rotate * 4):  # 16 weight sets: more than the L2 holds
            k1, k2 = jax.random.split(jax.random.fold_in(key, 1000 + i))
            xs_.append(jax.random.normal(k1, (m, k), jnp.float32).astype(jnp.bfloat16))
            ws_.append(jax.random.normal(k2, (k, n), jnp.float32) / np.sqrt(k))
        bf = [(x, w.astype(jnp.bfloat16)) for x, w in zip(xs_, ws_)]
        row["xla_bf16"] = time_ms(lambda x, w: jnp.dot(x, w), bf, args.iters)
        for name, bits, g in variants:
            from jdq import formats

            opts = dict(granularity="group", group_size=g) if g else dict(granularity="row")
            sets = []
            for x, w in zip(xs_, ws_):
                qt = formats.quantize(w, f"int{bits}", axis=-2, **opts)
                codes = qt.codes.T
                sc = jnp.maximum(qt.scale, 2.0**-126).reshape(-1, n).T if g else qt.scale.reshape(n, 1)
                sets.append((x, wref.pack_int4(codes) if bits == 4 else codes, sc))
            gs = g or k
            try:
                x0, c0, s0 = sets[0]
                got = weight_only_matmul_gpu(x0, c0, s0, None, bits, gs, jnp.float32, cfg, interpret=interpret)
                want = wref.weight_only_matmul(x0, c0, s0, None, bits, gs, jnp.float32)
                rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
                results["wo_checks"].append({"shape": label, "variant": name, "relerr": rel})
                if not rel < 1e-4:
                    print(f"  {label} {name}: CHECK FAILED relerr {rel}", flush=True)
                    continue
                row[name] = time_ms(lambda x, c, s, bits=bits, gs=gs: weight_only_matmul_gpu(x, c, s, None, bits, gs, jnp.bfloat16, cfg, interpret=interpret), sets, args.iters)
                row[name + "_xla"] = time_ms(
                    lambda x, c, s, bits=bits, gs=gs: jnp.dot(x, wref.dequantize(c, s, bits, gs).astype(jnp.bfloat16).T), sets, args.iters)
            except Exception as e:  # noqa: BLE001
                print(f"  {label} {name} failed: {type(e).__name__} {str(e)[:300]}", flush=True)
        results["wo_rows"].append(row)
        save()
        print(f"{label:16s} " + "  ".join(f"{c}={row[c] * 1e3:.1f}us" for c in row if c not in ("shape", "m", "k", "n")), flush=True)


def print_wo_table(results):
    """Markdown table: weight-only kernels, microseconds and speedup vs XLA bf16."""
    if not results.get("wo_rows"):
        return
    cols = ["w8a16", "w4a16_ch", "w4a16_g128"]
    print("\n| shape | M | XLA bf16 us | " + " | ".join(f"{c} us (×bf16) | XLA deq+dot {c} us" for c in cols) + " |")
    print("|---|---|---|" + "---|---|" * len(cols))
    for r in results["wo_rows"]:
        cells = []
        for c in cols:
            t, tx = r.get(c), r.get(c + "_xla")
            cells.append(f"{t * 1e3:.1f} ({r['xla_bf16'] / t:.2f})" if t else "-")
            cells.append(f"{tx * 1e3:.1f}" if tx else "-")
        print(f"| {r['shape']} | {r['m']} | {r['xla_bf16'] * 1e3:.1f} | " + " | ".join(cells) + " |")


def print_table(results):
    """Markdown table of TFLOP/s and ratios to the XLA baselines."""
    print(f"\njax {results['jax']}, {results['device']}; TFLOP/s (TOP/s for int8), ratio = time(XLA) / time(jdq)")
    print("| shape | M | K | N | XLA bf16 | XLA int8 | XLA fp8 | XLA W8A8 | jdq W8A8 GEMM | jdq W8A8 linear | ×bf16 | ×int8 | ×fp8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        fl = 2 * r["m"] * r["n"] * r["k"]
        tf = lambda c: f"{fl / r[c] / 1e9:.0f}" if r.get(c) else "-"  # noqa: E731
        lin = r.get("w8a8_linear")
        ratio = lambda c: f"{r[c] / lin:.2f}" if (lin and r.get(c)) else "-"  # noqa: E731
        print(f"| {r['shape']} | {r['m']} | {r['k']} | {r['n']} | {tf('xla_bf16')} | {tf('xla_int8')} | {tf('xla_fp8')} | {tf('xla_w8a8')} | {tf('w8a8_gemm')} | {tf('w8a8_linear')} | {ratio('xla_bf16')} | {ratio('xla_int8')} | {ratio('xla_fp8')} |")


if __name__ == "__main__":
    sys.exit(main())
