"""MixDiT activation split: the one-pass kernel against XLA's, and where XLA's time goes (one GPU).

Kernel vs XLA (H100 / H200; checks first, in a child process, then timing; < 4 min on an H200)::

    python benchmarks/mixdit_split.py --device-run --out $OUT [--shapes dit.b32,pixart] [--budget-s 200]

times, at DiT-XL/2 batch 32 (M = 8192) and PixArt-Σ-1024 (M = 4096) for the four linears (qkv
1152→3456, proj 1152→1152, fc1 1152→4608, fc2 4608→1152; 5 % outlier channels, ordered as
``jdq.quant.outliers.channel_permutation`` orders them): the split alone
(``jdq.kernels.mixdit.split_gpu`` vs ``ref.quantize_activation``), the whole MixDiT linear (split +
GEMM kernel) with either split, and XLA's bf16 dot; writes ``mixdit_split.json`` / ``.md`` to
``--out`` and prints the table. The split kernel is first run and compared bit for bit with XLA's
split in a child process (a kernel that fails to compile or crashes is reported and its rows time
only the XLA paths). ``--tiny``: the same on a CPU, one tiny shape, Pallas interpret mode (a smoke test).

Where XLA's split spends its time (the original profile; no kernel)::

    python benchmarks/mixdit_split.py [--profile-out $OUT/mixdit_split_xla.md]

Times, at DiT-XL/2 b32 shapes (M = 8192; K = 1152 for qkv / fc1 / proj inputs, 4608 for fc2),
``jdq.kernels.mixdit.ref.quantize_activation`` (the split the MixDiT kernel is fed with) against
its parts in the same run: the channel permutation alone (``jnp.take``), the split with the
identity permutation (``jnp.arange``, a constant XLA may simplify), and a plain copy of the
activation. The permutation is what
``jdq.quant.outliers.channel_permutation`` makes (outlier channels first, the rest ascending),
with 5 % outlier channels. Each row: median of repeated jitted calls, and the number of XLA
fusions in the optimized HLO. Single calls: at K = 1152 the copy's time is mostly dispatch (on
an H200 37 µs for ~9 µs of memory traffic), so compare the rows at K = 4608. Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdq.io import atomic_write_text  # noqa: E402
from jdq.kernels.mixdit import ref  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
SHAPE_SETS = {"dit.b32": 8192, "pixart": 4096, "tiny": 256}
HI_FRAC = 0.05


def time_call(fn, args, reps=20, inner=5):
    """Median seconds per call of jitted ``fn(*args)``."""
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def fusion_count(fn, args) -> int:
    """Fusions in the entry computation of ``fn``'s optimized HLO."""
    text = fn.lower(*args).compile().as_text()
    return len(re.findall(r" fusion\(", text[text.find("ENTRY"):]))


def table(m: int = 8192, ks=(1152, 4608), ratio: float = 0.05) -> str:
    """Markdown table of the split and its parts at each K."""
    dev = jax.devices()[0]
    lines = [f"Device: {dev.device_kind}, jax {jax.__version__}; M = {m}, bf16 activations, {ratio:.0%} outlier channels.",
             "", "| K | variant | µs | fusions |", "|---:|---|---:|---:|"]
    for k in ks:
        x = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(jnp.bfloat16)
        k_hi = int(round(ratio * k / 16)) * 16
        hot = np.sort(np.random.default_rng(0).choice(k, k_hi, replace=False))
        perm = jnp.asarray(np.concatenate([hot, np.setdiff1d(np.arange(k), hot)]))
        variants = {
            "copy (−x)": (jax.jit(lambda a, p: -a), (x, perm)),
            "permutation alone (jnp.take)": (jax.jit(lambda a, p: jnp.take(a, p, axis=-1)), (x, perm)),
            "split, identity permutation": (jax.jit(lambda a, p: ref.quantize_activation(a, jnp.arange(k), k_hi)), (x, perm)),
            "split (quantize_activation)": (jax.jit(lambda a, p: ref.quantize_activation(a, p, k_hi)), (x, perm)),
        }
        for label, (fn, args) in variants.items():
            lines.append(f"| {k} | {label} | {time_call(fn, args) * 1e6:.1f} | {fusion_count(fn, args)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ kernel vs XLA


def shapes(sets: str):
    """(label, M, K, N) of the linears of each shape set (``dit.b32``, ``pixart``; ``tiny``: one small shape)."""
    out = []
    for name in [s for s in sets.split(",") if s]:
        if name not in SHAPE_SETS:
            raise SystemExit(f"--shapes: {name!r} is not one of {sorted(SHAPE_SETS)}")
        if name == "tiny":
            out.append(("tiny", 256, 256, 128))
            continue
        out += [(f"{name}.{layer}", SHAPE_SETS[name], k, n) for layer, (k, n) in LAYERS.items()]
    return out


def k_hi_of(k: int) -> int:
    """Outlier channels (a multiple of the 16-block) for ``k`` input features."""
    return int(round(HI_FRAC * k / 16)) * 16


def operands(m, k, n, rotate, seed=0):
    """``rotate`` sets (x bf16 with a few large channels, LoweredWeight, bias) sharing one outlier permutation."""
    from jdq import formats
    from jdq.kernels.op import LoweredWeight

    k_hi = k_hi_of(k)
    col = jnp.where(jnp.arange(k) % 23 == 5, 12.0, 1.0)
    key = jax.random.key(seed)
    hot = np.sort(np.asarray(jnp.argsort(-col, stable=True)[:k_hi]))
    perm = jnp.asarray(np.concatenate([hot, np.setdiff1d(np.arange(k), hot)]), jnp.int32)
    w = jax.random.normal(jax.random.fold_in(key, 99), (k, n), jnp.float32) / np.sqrt(k)
    w_hi, w_lo, s_w, _ = ref.pack_weight(w, perm, k_hi)
    lw = LoweredWeight(w_lo, s_w, "mixdit", k, n, None, {"w_hi": w_hi, "perm": perm},
                       (("k_hi", k_hi), ("hi", formats.get("mx9")), ("lo", formats.get("mx6"))))
    sets = []
    for i in range(rotate):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        x = (jax.random.normal(k1, (m, k), jnp.float32) * col).astype(jnp.bfloat16)
        sets.append((x, w.astype(jnp.bfloat16), jax.random.normal(k2, (n,), jnp.float32) * 0.1))
    return lw, sets


def _bits(a):
    return np.asarray(jax.lax.bitcast_convert_type(a, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]))


def parse_config(token: str):
    """A split-kernel config from a token: ``default`` (the tuning row) or ``e<elems>[n][b][l][r<max rows>]``
    (``e48``: 48 MX6 values per thread; ``n``: no bank spreading; ``c``: E4M3 codes by the conversion instruction
    instead of integer ops; ``l``: a loop over the blocks instead of unrolled code; ``t``: the gather table
    in shared memory; ``r4``: at most 4 rows per CTA)."""
    from jdq.kernels import tuning
    from jdq.kernels.mixdit.split_gpu import SplitConfig

    if token == "default":
        return SplitConfig(**tuning.lookup("mixdit_split", 8192))
    m = re.fullmatch(r"e(\d+)(n?)(c?)(l?)(t?)(?:r(\d+))?", token)
    if not m:
        raise SystemExit(f"--split-configs: {token!r} is not 'default' or e<elems>[n][c][l][t][r<rows>] (e.g. e80, "
                         "e48n, e80c, e160l, e160lt)")
    return SplitConfig(elems_per_thread=int(m[1]), spread_banks=not m[2], e4m3="cvt" if m[3] else "bits",
                       loop=bool(m[4]), table_smem=bool(m[5]), max_rows=int(m[6] or 32))


@functools.lru_cache(maxsize=None)
def _check_operands(m, k):
    """(lw, x, XLA's split of x) for the checks at (M, K), shared by every config."""
    from jdq.kernels.mixdit import api

    lw, sets = operands(m, k, 128, 1)
    x = sets[0][0]
    return lw, x, jax.jit(lambda a, w: api.quantize_activation(a, w, "xla", split="xla"))(x, lw)


def check_split(m, k, impl, token="default"):
    """Kernel split (config ``token``) vs XLA split on one operand set: ``{"ok", "mismatches", "seconds"}`` (bits)."""
    from jdq.kernels.mixdit import api

    lw, x, want = _check_operands(m, k)
    t0 = time.time()
    got = jax.block_until_ready(api.quantize_activation(x, lw, impl, split="kernel", config=parse_config(token)))
    bad = {name: int((_bits(g) != _bits(w)).sum()) if g.shape == w.shape else -1
           for name, g, w in zip(("x_hi", "x_lo", "s_x"), got, want)}
    return {"ok": not any(bad.values()), "mismatches": bad, "seconds": round(time.time() - t0, 1)}


def _key(m, k, token):
    return f"{m}x{k}@{token}"


def _parse_key(key):
    mk, token = key.split("@")
    m, k = mk.split("x")
    return int(m), int(k), token


def run_check_child(out_dir, keys, impl):
    """Child process: one JSON line per split check ``MxK@config``, flushed (the parent reads them after a crash)."""
    path = os.path.join(out_dir, "mixdit_split_checks.jsonl")
    for key in keys:
        with open(path, "a") as f:
            f.write(json.dumps({"key": key, "started": True}) + "\n")
        try:
            res = check_split(*_parse_key(key)[:2], impl, _parse_key(key)[2])
        except Exception as e:  # noqa: BLE001  (a kernel that does not compile is a result, not a stop)
            res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:600]}", "trace": traceback.format_exc()[-1500:]}
        res["key"] = key
        with open(path, "a") as f:
            f.write(json.dumps(res, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"check split {key}: " + json.dumps({a: b for a, b in res.items() if a != "trace"}), flush=True)


def run_checks(out_dir, keys, impl, budget_s):
    """The split checks in child processes, resuming after one that crashes: ``{key: result}``."""
    path = os.path.join(out_dir, "mixdit_split_checks.jsonl")
    if os.path.exists(path):
        os.remove(path)
    results, todo, t_end = {}, list(keys), time.time() + budget_s
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    while todo and time.time() < t_end:
        cmd = [sys.executable, os.path.abspath(__file__), "--check-child", "--out", out_dir, "--impl", impl,
               "--keys", ",".join(todo)]
        try:
            rc = subprocess.run(cmd, env=env, timeout=max(5.0, t_end - time.time())).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        lines = [json.loads(s) for s in open(path)] if os.path.exists(path) else []
        results.update({r["key"]: r for r in lines if "ok" in r})
        pending = [r["key"] for r in lines if r.get("started") and r["key"] not in results]
        if rc == 0 or not pending:
            break
        results[pending[-1]] = {"ok": False, "error": f"child process ended ({rc}) during this check"}
        todo = [key for key in todo if key not in results]
    return results


def sweep(keys, checks, args, copy_gbs, impl):
    """The split kernel alone for each checked ``MxK@config`` (one operand shape per M, K): rows of µs."""
    from jdq.kernels.mixdit import api, split_gpu

    out = []
    for key in keys:
        m, k, token = _parse_key(key)
        cfg = parse_config(token)
        k_hi = k_hi_of(k)
        khp, klp = split_gpu.part_sizes(k, k_hi)
        row = {"key": key, "M": m, "K": k, "config": token, "rows": cfg.rows(m, klp),
               "floor_us": (m * k * 2 + m * khp * 2 + m * klp + m * 4) / (copy_gbs * 1e3) if copy_gbs else None}
        if key not in checks:
            row["us"] = "skipped (not checked: budget)"
        elif not checks[key].get("ok"):
            row["us"] = "skipped (check failed)"
        elif time.time() > args.t_end:
            row["us"] = "skipped (budget)"
        else:
            lw, sets = operands(m, k, 128, args.rotate)
            try:
                row["us"] = kb_time(lambda x, lw: api.quantize_activation(x, lw, impl, split="kernel", config=cfg),
                                    [(x, lw) for x, _, _ in sets], args.iters)
            except Exception as e:  # noqa: BLE001
                row["us"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        print(f"  sweep {key:24s} rows {row['rows']:3d}  {row['us']}", flush=True)
        out.append(row)
    return out


def kb_time(fn, sets, iters):
    """Median µs per call (``benchmarks/kernels.py``'s CUPTI timing, wall clock without a GPU)."""
    return _kernels_module().time_ms(fn, sets, iters) * 1e3


def measure(label, m, k, n, args, check, copy_gbs, impl):
    """Times (µs) of one shape: XLA bf16 dot, both splits alone, the linear with each split; equality of the linears."""
    from jdq.kernels.mixdit import api, split_gpu

    lw, sets = operands(m, k, n, args.rotate)
    k_hi = k_hi_of(k)
    khp, klp = split_gpu.part_sizes(k, k_hi)
    floor_bytes = m * k * 2 + m * khp * 2 + m * klp + m * 4
    row = {"label": label, "M": m, "K": k, "N": n, "k_hi": k_hi, "floor_bytes": floor_bytes,
           "floor_us": floor_bytes / (copy_gbs * 1e3) if copy_gbs else None, "split_check": check}
    kernel_ok = bool(check and check.get("ok"))
    # the packed weight is an argument, as in a lowered model (not a constant XLA could fold the permutation into)
    xs = [(x, lw) for x, _, _ in sets]
    xbs = [(x, lw, b) for x, _, b in sets]
    variants = {
        "xla_bf16": (lambda x, w: jnp.dot(x, w), [(x, w) for x, w, _ in sets]),
        "xla_split": (lambda x, lw: api.quantize_activation(x, lw, "xla", split="xla"), xs),
        "kernel_split": (lambda x, lw: api.quantize_activation(x, lw, impl, split="kernel"), xs),
        "linear_xla_split": (lambda x, lw, b: api.mixdit_matmul(x, lw, b, jnp.bfloat16, impl, split="xla"), xbs),
        "linear_kernel_split": (lambda x, lw, b: api.mixdit_matmul(x, lw, b, jnp.bfloat16, impl, split="kernel"), xbs),
    }
    for name, (fn, ss) in variants.items():
        cached = args.split_times.get((m, k, name))  # the split alone depends on M and K only
        if "kernel" in name and not kernel_ok:
            row[name] = "skipped (split check failed)"
            continue
        if cached is not None:
            row[name] = cached
            continue
        if time.time() > args.t_end:
            row[name] = "skipped (budget)"
            continue
        try:
            row[name] = kb_time(fn, ss, args.iters)
        except Exception as e:  # noqa: BLE001
            row[name] = f"error: {type(e).__name__}: {str(e)[:300]}"
        if name.endswith("split") and not name.startswith("linear") and isinstance(row[name], float):
            args.split_times[(m, k, name)] = row[name]
        print(f"  {label:14s} {name:20s} {row[name] if isinstance(row[name], str) else f'{row[name]:9.1f} µs'}",
              flush=True)
    if kernel_ok and all(isinstance(row.get(v), float) for v in ("linear_xla_split", "linear_kernel_split")):
        x, _, b = sets[0]
        a = api.mixdit_matmul(x, lw, b, jnp.bfloat16, impl, split="kernel")
        c = api.mixdit_matmul(x, lw, b, jnp.bfloat16, impl, split="xla")
        row["linears_equal"] = bool(np.array_equal(_bits(a), _bits(c)))
    return row


@functools.lru_cache(maxsize=None)
def _kernels_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("jdq_benchmark_kernels", os.path.join(HERE, "kernels.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _f(r, key, fmt="{:.1f}"):
    v = r.get(key)
    return fmt.format(v) if isinstance(v, float) else ("-" if v is None else "n/a")


def _ratio(r, num, den):
    a, b = r.get(num), r.get(den)
    return f"{a / b:.2f}×" if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"


def render(results) -> str:
    """Markdown: device, copy bandwidth, one row per shape (times in µs, ratios)."""
    meta = results["meta"]
    lines = [f"Device: {meta['device']}, jax {meta['jax']}; copy bandwidth {meta['copy_gbs']:.0f} GB/s; "
             f"{meta['iters']} iterations × {meta['rotate']} operand sets (median); 5 % outlier channels; "
             f"impl {meta['impl']}.", "",
             "| shape | M | K→N | XLA split µs | kernel split µs | split speedup | kernel % of HBM floor | "
             "linear, kernel split µs | linear, XLA split µs | XLA bf16 dot µs | linear ×bf16 (kernel split) | "
             "linear ×bf16 (XLA split) | checks |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["rows"]:
        chk = r.get("split_check")
        if "split_check" not in r:  # the row was never measured (the budget ran out before it)
            checks = "not run (budget)"
        elif chk is None:  # measured, but the child process's checks did not reach this shape
            checks = "split not checked"
        else:
            checks = "split bit-exact" if chk.get("ok") else f"split FAILED: {chk.get('error') or chk.get('mismatches')}"
        if "linears_equal" in r:
            checks += ", linears equal" if r["linears_equal"] else ", linears DIFFER"
        floor = (f"{100 * r['floor_us'] / r['kernel_split']:.0f} %"
                 if isinstance(r.get("kernel_split"), float) and r.get("floor_us") else "-")
        lines.append(f"| {r['label']} | {r['M']} | {r['K']}→{r['N']} | {_f(r, 'xla_split')} | {_f(r, 'kernel_split')} | "
                     f"{_ratio(r, 'xla_split', 'kernel_split')} | {floor} | {_f(r, 'linear_kernel_split')} | "
                     f"{_f(r, 'linear_xla_split')} | {_f(r, 'xla_bf16')} | {_ratio(r, 'xla_bf16', 'linear_kernel_split')} | "
                     f"{_ratio(r, 'xla_bf16', 'linear_xla_split')} | {checks} |")
    if results.get("sweep"):
        lines += ["", "Split kernel alone, by config (e<MX6 values per thread>, n: no bank spreading, c: E4M3 by the cvt instruction, "
                  "l: loop over blocks, t: table in shared memory, r: max rows):", "",
                  "| M×K | config | rows / CTA | µs | % of HBM floor | check |", "|---|---|---:|---:|---:|---|"]
        for r in results["sweep"]:
            chk = results.get("checks", {}).get(r["key"], {})
            us = r.get("us")
            pct = f"{100 * r['floor_us'] / us:.0f} %" if isinstance(us, float) and r.get("floor_us") else "-"
            lines.append(f"| {r['M']}×{r['K']} | {r['config']} | {r['rows']} | "
                         f"{f'{us:.1f}' if isinstance(us, float) else us} | {pct} | "
                         f"{'bit-exact' if chk.get('ok') else 'FAILED: ' + str(chk.get('error') or chk.get('mismatches'))} |")
    errors = [(r["label"], k, v) for r in results["rows"] for k, v in r.items() if isinstance(v, str) and
              v.startswith(("error", "skipped")) and k != "label"]
    if errors:
        lines += ["", "Not timed:"] + [f"* {a} {b}: {c}" for a, b, c in errors]
    return "\n".join(lines)


def compare(args) -> int:
    """``--device-run`` / ``--tiny``: checks in a child process, then timing; JSON + markdown to ``args.out``."""
    on_gpu = jax.default_backend() == "gpu"
    if args.device_run and not on_gpu:
        raise SystemExit("--device-run needs a GPU")
    impl = "gpu" if on_gpu else "gpu_interpret"
    if args.tiny:
        args.shapes, args.iters, args.rotate = "tiny", 1, 1
    out_dir = args.out or os.environ.get("OUT") or os.path.join(HERE, "results", "latest")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    args.t_end = t0 + args.budget_s
    args.split_times = {}
    shape_list = shapes(args.shapes)
    tokens = [t for t in args.split_configs.split(",") if t]
    for t in tokens:
        parse_config(t)
    mks = sorted({(m, k) for _, m, k, _ in shape_list})
    sweep_mks = [(m, k) for m, k in mks if m == max(mm for mm, _ in mks)]  # the sweep at the largest M only
    keys = [_key(m, k, "default") for m, k in mks] + [_key(m, k, t) for t in tokens if t != "default" for m, k in sweep_mks]
    checks = run_checks(out_dir, keys, impl, max(30.0, 0.45 * args.budget_s))
    kb = _kernels_module()
    copy_gbs = kb.copy_bandwidth_gbs(args.iters, (args.copy_mib << 20) // 4) if on_gpu else 0.0
    results = {"meta": {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "impl": impl,
                        "copy_gbs": copy_gbs, "iters": args.iters, "rotate": args.rotate, "shapes": args.shapes},
               "checks": checks, "rows": []}
    big_m = max(m for _, m, _, _ in shape_list)
    first = [s for s in shape_list if s[1] == big_m]  # order under the budget: the largest M, the sweep, the rest
    for phase in ("first", "sweep", "rest"):
        if phase == "sweep":
            if len(tokens) > 1 or tokens != ["default"]:
                results["sweep"] = sweep([_key(m, k, t) for m, k in sweep_mks for t in tokens], checks, args,
                                         copy_gbs, impl)
            continue
        for label, m, k, n in (first if phase == "first" else [s for s in shape_list if s[1] != big_m]):
            if time.time() > args.t_end:
                results["rows"].append({"label": label, "M": m, "K": k, "N": n, "xla_split": "skipped (budget)"})
                continue
            results["rows"].append(measure(label, m, k, n, args, checks.get(_key(m, k, "default")), copy_gbs, impl))
            _write(out_dir, results)
    results["meta"]["seconds"] = round(time.time() - t0, 1)
    _write(out_dir, results)
    print(render(results))
    return 0


def _write(out_dir, results):
    atomic_write_text(os.path.join(out_dir, "mixdit_split.json"), json.dumps(results, indent=1, default=str) + "\n")
    atomic_write_text(os.path.join(out_dir, "mixdit_split.md"), render(results) + "\n")


def main(argv=None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-run", action="store_true", help="kernel split vs XLA split and the linears, on a GPU")
    p.add_argument("--tiny", action="store_true", help="the --device-run path on a CPU, one tiny shape (interpret)")
    p.add_argument("--out", help="results folder of --device-run / --tiny (default $OUT, else benchmarks/results/latest)")
    p.add_argument("--shapes", default="dit.b32,pixart", help="shape sets: dit.b32 (M = 8192), pixart (M = 4096)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rotate", type=int, default=3, help="operand sets cycled per timing (defeats the L2)")
    p.add_argument("--budget-s", type=float, default=200.0, help="stop starting new timings after this long")
    p.add_argument("--copy-mib", type=int, default=256)
    p.add_argument("--split-configs", default="default",
                   help="also time the split kernel alone with these configs at the largest M (comma list: default, "
                        "e<elems>[n][c][l][t][r<rows>])")
    p.add_argument("--m", type=int, default=8192, help="profile mode: rows (tokens × batch)")
    p.add_argument("--profile-out", help="profile mode: also write the table (markdown) to this path")
    p.add_argument("--check-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--keys", default="", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="gpu", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.check_child:
        run_check_child(args.out, [s for s in args.keys.split(",") if s], args.impl)
        return 0
    if args.device_run or args.tiny:
        return compare(args)
    text = table(args.m)
    print(text)
    if args.profile_out:
        atomic_write_text(args.profile_out, text + "\n", parents=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
