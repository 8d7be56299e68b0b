"""Fused W8A8 block ops against XLA bf16, measured in one run: the producer (LayerNorm + adaLN modulation)
fused into the activation quantization, the gated residual and the q/k/v split fused into the GEMM
epilogue, and a W8A8 GEMM tile sweep.

Run on a GPU: ``python benchmarks/fused.py --device-run [--out DIR] [--budget-s S]``; on a CPU a tiny
smoke version runs the same code paths in Pallas interpret mode.

Each pair compares the same piece of a DiT block in both precisions (the W8A8 side is what
``jdq.kernels.lowered_linear`` runs for a lowered site with ``norm`` / ``residual`` / ``split``):

* ``norm+linear`` (qkv, fc1): XLA ``modulate(layer_norm(x)) @ W`` in bf16 vs ``norm_quant`` kernel +
  W8A8 GEMM (``jdq_norm_w8a8``) and vs the unfused W8A8 path (XLA norm + token-quant kernel + GEMM);
* ``linear+residual`` (proj, fc2): XLA ``x + gate·(h @ W)`` vs the GEMM with the residual in its
  epilogue (``jdq_w8a8_resid``: pre-quantized input; fc2's GELU → int8 token quantization is timed
  separately as ``jdq_quant``);
* ``qkv split``: XLA one dot + three q/k/v copies (what attention needs) vs three dots vs the GEMM
  writing q, k, v itself (``jdq_w8a8_split``);
* the GEMM alone (``jdq_w8a8_gemm``) and, with ``--w8a8-configs``, once per tile config.

Before timing, every kernel is checked on the device against its reference on fresh random inputs
(bit-exact where the arithmetic is exact). Times: the median of CUPTI-measured iterations over
``--rotate`` input sets (``benchmarks/kernels.py``'s ``time_ms``). Results: ``fused.json`` /
``fused.md`` under ``--out`` (default ``$OUT``, else ``benchmarks/results/latest``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernels as kb  # noqa: E402  (benchmarks/kernels.py: timing, copy bandwidth, peaks)

TOKENS = 256  # DiT-XL/2-256 tokens per image
SHAPES = {"dit.b32": (32, TOKENS), "dit.b64": (64, TOKENS), "pixart": (1, 4096)}  # (samples, tokens per sample)
LAYERS = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
PAIRS = {  # layer -> variants timed there (first: the XLA bf16 baseline of that piece)
    "qkv": ("xla_bf16", "xla_norm_bf16", "jdq_norm_w8a8", "jdq_unfused_w8a8", "xla_norm", "jdq_norm_quant",
            "xla_bf16_slices", "xla_bf16_3dots", "jdq_w8a8_split", "jdq_w8a8_gemm"),
    "fc1": ("xla_bf16", "xla_norm_bf16", "jdq_norm_w8a8", "jdq_unfused_w8a8", "jdq_w8a8_gemm"),
    "proj": ("xla_bf16", "xla_bf16_resid", "jdq_w8a8_resid", "jdq_w8a8_gemm", "jdq_quant"),
    "fc2": ("xla_bf16", "xla_bf16_resid", "jdq_w8a8_resid", "jdq_w8a8_gemm", "jdq_quant"),
}
PEAK = {"xla_bf16": "bf16", "xla_norm_bf16": "bf16", "xla_bf16_slices": "bf16", "xla_bf16_3dots": "bf16",
        "xla_bf16_resid": "bf16", "xla_norm": None, "jdq_norm_quant": None, "jdq_quant": None}
RATIO_OF = {  # variant -> the bf16 variant it is compared with
    "jdq_norm_w8a8": "xla_norm_bf16", "jdq_unfused_w8a8": "xla_norm_bf16", "jdq_norm_quant": "xla_norm",
    "xla_bf16_3dots": "xla_bf16_slices", "jdq_w8a8_split": "xla_bf16_slices", "jdq_w8a8_resid": "xla_bf16_resid",
    "jdq_w8a8_gemm": "xla_bf16"}


def parse_w8a8_config(spec):
    """``ws128x64n4`` / ``ws128x128n3m`` / ``pipe128x128s2`` -> a W8A8 ``Config`` (kind, tiles, wg dim, stages, grid minor)."""
    import re

    from jdq.kernels.w8a8.gpu import Config

    mt = re.fullmatch(r"(ws|pipe)(\d+)x(\d+)([mn]?)(?:s?)(\d)(m?)", spec)
    if not mt:
        raise SystemExit(f"--w8a8-configs: cannot parse {spec!r} (e.g. ws128x64n4, ws128x128n3m, pipe128x128s2)")
    kind, tm, tn, wg, stages, minor = mt.groups()
    kw = dict(kind=kind, tile_m=int(tm), tile_n=int(tn), tile_k=128, stages=int(stages))
    if kind == "ws":
        kw.update(wg_dim=wg or "n", grid_minor="m" if minor else "n", num_sms=kb_num_sms())
    return Config(**kw)


def norm_config(spec):
    """``"40"`` -> the norm_quant ``Config`` with a 40 KiB shared-memory budget (which picks the rows per CTA)."""
    from jdq.kernels.norm_quant.gpu import Config

    return Config(smem_bytes=int(spec) * 1024)


def kb_num_sms():
    from jdq.kernels._mgpu import num_sms

    return num_sms()


def operands(key, samples, tokens, k, n, rotate, dtype=jnp.bfloat16):
    """``rotate`` sets of {x (M, K), w (K, N) f32, b, shift / scale / gate (samples, ·), residual (M, N)}."""
    sets = []
    for i in range(rotate):
        ks = jax.random.split(jax.random.fold_in(key, i), 7)
        m = samples * tokens
        sets.append(dict(
            x=(jax.random.normal(ks[0], (m, k)) * 2 + 0.5).astype(dtype),
            w=jax.random.normal(ks[1], (k, n)) / np.sqrt(k),
            b=jax.random.normal(ks[2], (n,)) * 0.1,
            shift=(jax.random.normal(ks[3], (samples, k)) * 0.3).astype(dtype),
            scale=(jax.random.normal(ks[4], (samples, k)) * 0.3).astype(dtype),
            gate=(jax.random.normal(ks[5], (samples, n)) * 0.3).astype(dtype),
            res=jax.random.normal(ks[6], (m, n)).astype(dtype)))
    return sets


def variant(name, sets, tokens, impl, config=None):
    """``(fn, arg_sets)`` timing variant ``name`` (see the module docstring) on ``sets``."""
    from jdq import kernels as K
    from jdq.kernels.token_quant.ref import quantize_rows
    from jdq.kernels.w8a8 import ref as w8
    from jdq.models.layers import layer_norm, modulate

    def norm(x, shift, scale):
        xb = x.reshape(-1, tokens, x.shape[-1])
        return modulate(layer_norm(xb), shift, scale).reshape(x.shape)

    class Norm:  # the attributes lowered_linear reads from jdq.models.layers.AdaNorm
        def __init__(self, shift, scale):
            self.shift, self.scale, self.eps = shift, scale, 1e-6

    bf = [(s["x"], s["w"].astype(jnp.bfloat16), s["b"].astype(jnp.bfloat16), s) for s in sets]
    if name == "xla_bf16":
        return (lambda x, w, b: x @ w + b), [(x, w, b) for x, w, b, _ in bf]
    if name == "xla_norm_bf16":
        return (lambda x, w, b, sh, sc: norm(x, sh, sc) @ w + b), [(x, w, b, s["shift"], s["scale"]) for x, w, b, s in bf]
    if name == "xla_norm":
        return norm, [(s["x"], s["shift"], s["scale"]) for s in sets]
    if name == "xla_bf16_slices":  # what attention receives unfused: three separate q, k, v buffers
        return (lambda x, w, b: tuple(jnp.split(x @ w + b, 3, axis=-1))), [(x, w, b) for x, w, b, _ in bf]
    if name == "xla_bf16_3dots":
        def three(x, w, b):
            return tuple(x @ wi + bi for wi, bi in zip(jnp.split(w, 3, axis=-1), jnp.split(b, 3)))
        return three, [(x, w, b) for x, w, b, _ in bf]
    if name == "xla_bf16_resid":
        def resid(x, w, b, r, g):
            y = x @ w + b
            return (r.reshape(-1, tokens, r.shape[-1]) + g[:, None, :] * y.reshape(-1, tokens, y.shape[-1])).reshape(r.shape)
        return resid, [(x, w, b, s["res"], s["gate"]) for x, w, b, s in bf]
    q8 = [(s,) + w8.quantize_per_channel(s["w"].T) for s in sets]
    if name == "jdq_norm_w8a8":
        def fused(x, wq, ws, b, sh, sc):
            q = K.norm_quantize_tokens(x.reshape(-1, tokens, x.shape[-1]), Norm(sh, sc), "int8", impl)
            if q is None:
                raise ValueError("norm_quant kernel does not fit this shape")
            return K.w8a8_matmul(*q, wq, ws, b, jnp.bfloat16, impl, config)
        return fused, [(s["x"], wq, ws, s["b"], s["shift"], s["scale"]) for s, wq, ws in q8]
    if name == "jdq_unfused_w8a8":
        return (lambda x, wq, ws, b, sh, sc: K.w8a8_matmul(*K.quantize_tokens(norm(x, sh, sc), "int8", impl), wq, ws, b,
                                                           jnp.bfloat16, impl, config)), \
            [(s["x"], wq, ws, s["b"], s["shift"], s["scale"]) for s, wq, ws in q8]
    if name == "jdq_norm_quant":
        def nq(x, sh, sc):
            q = K.norm_quantize_tokens(x.reshape(-1, tokens, x.shape[-1]), Norm(sh, sc), "int8", impl, config)
            if q is None:
                raise ValueError("norm_quant kernel does not fit this shape")
            return q
        return nq, [(s["x"], s["shift"], s["scale"]) for s in sets]
    if name == "jdq_quant":
        return (lambda x: K.quantize_tokens(x, "int8", impl)), [(s["x"],) for s in sets]
    pre = [quantize_rows(s["x"]) + (wq, ws, s["b"], s) for s, wq, ws in q8]
    if name == "jdq_w8a8_gemm":
        return (lambda xq, xs, wq, ws, b: K.w8a8_matmul(xq, xs, wq, ws, b, jnp.bfloat16, impl, config)), \
            [p[:5] for p in pre]
    if name == "jdq_w8a8_split":
        return (lambda xq, xs, wq, ws, b: K.w8a8_matmul(xq, xs, wq, ws, b, jnp.bfloat16, impl, config, split=3)), \
            [p[:5] for p in pre]
    if name == "jdq_w8a8_resid":
        return (lambda xq, xs, wq, ws, b, r, g: K.w8a8_matmul(xq, xs, wq, ws, b, jnp.bfloat16, impl, config,
                                                              residual=r, gate=g)), \
            [p[:5] + (p[5]["res"], p[5]["gate"]) for p in pre]
    raise ValueError(f"unknown variant {name!r}")


def checks(small):
    """Device checks of the fused kernels against their references: ``{name: result}``."""
    from jdq.kernels.norm_quant.gpu import Config as NCfg, norm_quantize_rows_gpu
    from jdq.kernels.norm_quant.ref import norm_quantize_rows
    from jdq.kernels.w8a8 import ref as w8
    from jdq.kernels.w8a8.gpu import Config as WCfg, w8a8_matmul_gpu

    interp = jax.default_backend() != "gpu"
    m, k, n, tokens = (128, 128, 384, 64) if small else (2048, 1152, 3456, 256)
    ws_cfg = WCfg("ws", 64, 64, 128, 2, wg_dim="n", num_sms=2) if small else WCfg(
        kind="ws", tile_m=128, tile_n=64, tile_k=128, stages=4, wg_dim="n", num_sms=kb_num_sms())
    keys = jax.random.split(jax.random.key(int(time.time()) % 10000), 8)  # fresh inputs every run
    out = {}

    def record(name, fn):
        t0 = time.time()
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001
            r = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        r["seconds"] = round(time.time() - t0, 1)
        out[name] = r
        print(f"check {name:22s} " + "  ".join(f"{a}={b}" for a, b in r.items()), flush=True)

    def nq(fmt):
        x = (jax.random.normal(keys[0], (m, k)) * 3 + jnp.linspace(-2, 2, k)).astype(jnp.bfloat16)
        sh = (jax.random.normal(keys[1], (m // tokens, k)) * 0.5).astype(jnp.bfloat16)
        sc = (jax.random.normal(keys[2], (m // tokens, k)) * 0.5).astype(jnp.bfloat16)
        cfg = NCfg(smem_bytes=8 * 1024) if small else NCfg()
        q, s = norm_quantize_rows_gpu(jnp.full_like(x, 7), sh, sc, tokens, fmt=fmt, config=cfg, interpret=interp)  # poison
        q, s = norm_quantize_rows_gpu(x, sh, sc, tokens, fmt=fmt, config=cfg, interpret=interp)
        q2, s2 = norm_quantize_rows(x, sh, sc, tokens, fmt=fmt)
        d = jnp.abs(q.astype(jnp.float32) - q2.astype(jnp.float32))
        frac = float(jnp.mean((d > 0).astype(jnp.float32)))
        srel = float(jnp.max(jnp.abs(s / s2 - 1)))
        # exact up to the rare code that a float32 summation-order ulp of h moves by one step
        return {"ok": frac < 1e-3 and srel < 1e-5, "code_mismatch_frac": frac, "scale_maxrel": srel}

    def operands_w8(fp8=False):
        xq = jax.random.randint(keys[3], (m, k), -127, 128, jnp.int8)
        wq = jax.random.randint(keys[4], (n, k), -127, 128, jnp.int8)
        xs = 2.0 ** jax.random.randint(keys[5], (m,), -12, -4).astype(jnp.float32)
        wsc = 2.0 ** jax.random.randint(keys[6], (n,), -12, -4).astype(jnp.float32)
        b = jnp.round(jax.random.normal(keys[7], (n,)) * 64) / 64
        return xq, xs, wq, wsc, b

    def split():
        ops = operands_w8()
        got = w8a8_matmul_gpu(*ops, jnp.float32, ws_cfg, interpret=interp, split=3)
        want = w8.split_columns(w8.w8a8_matmul(*ops, jnp.float32), 3)
        return {"ok": all(kb._eq(g, w) for g, w in zip(got, want)), "exact": all(kb._eq(g, w) for g, w in zip(got, want))}

    def resid():
        ops = operands_w8()
        r = jax.random.normal(keys[0], (m, n)).astype(jnp.bfloat16)
        g = jax.random.normal(keys[1], (m // tokens, n)).astype(jnp.bfloat16)
        got = w8a8_matmul_gpu(*ops, jnp.bfloat16, ws_cfg, interpret=interp, residual=r, gate=g)
        want = w8.gated_residual(w8.w8a8_matmul(*ops, jnp.bfloat16), r, g)
        return {"ok": kb._eq(got, want), "exact": kb._eq(got, want), "relerr": kb._rel(got, want)}

    record("norm_quant.int8", lambda: nq("int8"))
    record("norm_quant.fp8", lambda: nq("fp8_e4m3"))
    record("w8a8.split3", split)
    record("w8a8.resid", resid)
    return out


def check_config(cfg, small):
    """The W8A8 GEMM with ``cfg`` against the reference (power-of-two scales: bit-exact)."""
    from jdq.kernels.w8a8 import ref as w8
    from jdq.kernels.w8a8.gpu import w8a8_matmul_gpu

    cm, cn = cfg.cta_tile()
    m, k, n = 4 * cm, 1152, 2 * cn * 3
    keys = jax.random.split(jax.random.key(int(time.time()) % 10000 + 1), 5)
    xq = jax.random.randint(keys[0], (m, k), -127, 128, jnp.int8)
    wq = jax.random.randint(keys[1], (n, k), -127, 128, jnp.int8)
    xs = 2.0 ** jax.random.randint(keys[2], (m,), -12, -4).astype(jnp.float32)
    ws = 2.0 ** jax.random.randint(keys[3], (n,), -12, -4).astype(jnp.float32)
    b = jnp.round(jax.random.normal(keys[4], (n,)) * 64) / 64
    got = w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.float32, cfg, interpret=small)
    return kb._eq(got, w8.w8a8_matmul(xq, xs, wq, ws, b, jnp.float32))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-run", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--rotate", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--shapes", default="dit.b32,pixart,dit.b64", help=f"priority order, of {list(SHAPES)}")
    p.add_argument("--layers", default="qkv,fc1,proj,fc2")
    p.add_argument("--w8a8-configs", default="", help="GEMM tile sweep at the qkv / fc2 shapes, e.g. ws128x64n4,ws128x128n3")
    args = p.parse_args(argv)
    t0 = time.time()
    on_gpu = jax.default_backend() == "gpu"
    if args.device_run and not on_gpu:
        raise SystemExit("--device-run needs a GPU")
    small = not on_gpu
    out_dir = args.out or kb.default_out()
    os.makedirs(out_dir, exist_ok=True)
    impl = "gpu" if on_gpu else "gpu_interpret"
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "argv": sys.argv[1:], "rows": {}}
    res["checks"] = checks(small)
    passed = {k for k, v in res["checks"].items() if v.get("ok")}
    sweep = [c for c in args.w8a8_configs.split(",") if c]
    cfgs = {}
    for spec in sweep:
        try:
            cfg = parse_w8a8_config(spec)
            ok = check_config(cfg, small)
        except Exception as e:  # noqa: BLE001  (a config that does not fit shared memory, say)
            res["checks"][f"w8a8@{spec}"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        res["checks"][f"w8a8@{spec}"] = {"ok": ok, "exact": ok}
        if ok:
            cfgs[spec] = cfg
    print(f"checks passed {len(passed)}/{len(res['checks'])}; sweep configs ok: {sorted(cfgs)}  [{time.time() - t0:.0f}s]",
          flush=True)
    needs = {"jdq_norm_w8a8": "norm_quant.int8", "jdq_norm_quant": "norm_quant.int8", "jdq_w8a8_split": "w8a8.split3",
             "jdq_w8a8_resid": "w8a8.resid"}
    res["copy_gbs"] = kb.copy_bandwidth_gbs(args.iters, (256 if on_gpu else 4) * 2**20 // 4)
    peaks = kb.PEAKS.get(res["device"], kb.PEAKS["NVIDIA H200"])
    json_path = os.path.join(out_dir, "fused.json")
    key = jax.random.key(0)
    layers = [x for x in args.layers.split(",") if x]
    shape_list = [("tiny", 2, 64)] if small else [(s, *SHAPES[s]) for s in args.shapes.split(",") if s]
    for tag, samples, tokens in shape_list:
        for layer in layers:
            k, n = (128, 384) if small else LAYERS[layer]
            if time.time() - t0 > args.budget_s:
                break
            label = f"{tag}.{layer}"
            m = samples * tokens
            sets = operands(key, samples, tokens, k, n, 1 if small else args.rotate)
            row = res["rows"].setdefault(label, {"m": m, "k": k, "n": n, "tokens": tokens, "us": {}, "roof_pct": {}})
            names = list(PAIRS[layer])
            if layer in ("qkv", "fc2") and tag != "pixart":
                names += [f"jdq_w8a8_gemm@{s}" for s in cfgs]
            if layer == "qkv":  # rows per CTA of the norm kernel: 16 (shared-memory passes), 4 (registers)
                names += ["jdq_norm_quant@72", "jdq_norm_quant@24"]
            for name in names:
                base, _, spec = name.partition("@")
                if base in needs and needs[base] not in passed:
                    continue
                try:
                    cfg = norm_config(spec) if base == "jdq_norm_quant" and spec else cfgs.get(spec)
                    fn, ss = variant(base, sets, tokens, impl, cfg)
                    ms = kb.time_ms(fn, ss, 1 if small else args.iters)
                except Exception as e:  # noqa: BLE001
                    row.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(f"  {label} {name} failed: {row['errors'][name]}", flush=True)
                    continue
                row["us"][name] = ms * 1e3
                cls = PEAK.get(base, "int8")
                nbytes = kb._nbytes(ss[0]) + kb._nbytes(jax.eval_shape(fn, *ss[0]))
                floor_ms = max(nbytes / res["copy_gbs"] / 1e6, 0.0 if cls is None else 2 * m * n * k / peaks[cls] * 1e3)
                row["roof_pct"][name] = 100 * floor_ms / ms
            kb.write_json(json_path, res)
            print(f"{label:14s} " + "  ".join(f"{c}={v:.1f}us" for c, v in row["us"].items()) + f"  [{time.time() - t0:.0f}s]",
                  flush=True)
    res["seconds"] = time.time() - t0
    kb.write_json(json_path, res)
    md = render(res)
    with open(os.path.join(out_dir, "fused.md.tmp"), "w") as f:
        f.write(md)
    os.replace(os.path.join(out_dir, "fused.md.tmp"), os.path.join(out_dir, "fused.md"))
    print(md)
    return 0


def render(res):
    """Markdown: checks, then per shape the µs of each variant, its % of roofline and its ratio to its bf16 piece."""
    lines = [f"jax {res['jax']}, {res['device']}; copy bandwidth {res['copy_gbs']:.0f} GB/s", "", "| check | ok | facts |",
             "|---|---|---|"]
    for name, r in res["checks"].items():
        lines.append(f"| {name} | {r.get('ok')} | " + ", ".join(f"{a}={b}" for a, b in r.items() if a != "ok") + " |")
    lines += ["", "| shape | variant | µs | % of roofline | × its bf16 piece (baseline) |", "|---|---|---:|---:|---|"]
    for label, row in res["rows"].items():
        for name, us in row["us"].items():
            base = RATIO_OF.get(name.partition("@")[0])
            ratio = f"{row['us'][base] / us:.2f} ({base})" if base in row["us"] and name.startswith("jdq") or (
                base in row["us"] and name == "xla_bf16_3dots") else "-"
            lines.append(f"| {label} | {name} | {us:.1f} | {row['roof_pct'][name]:.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
