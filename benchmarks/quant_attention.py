"""Fake-quant attention with the probabilities' cast fused (``jdq.kernels.quant_attention``) against the explicit XLA path and cuDNN, one run.

Run on a GPU: ``python benchmarks/quant_attention.py --device-run [--out DIR] [--budget-s S] [--formats ...]``;
``--tiny`` runs a small version of the same code paths on a CPU (the kernel in Pallas interpret mode).
Device command (≈ 60–120 s on an H200): ``python3 benchmarks/quant_attention.py --device-run --budget-s 150 --out $OUT``.

Shapes (``--shapes``, priority order): ``dit.b64`` — DiT-XL/2 at 256 px, batch 64 (32 + CFG), L = 256,
16 heads, D = 72; ``pixart`` — PixArt-Σ-1024, batch 2, L = 4096, 16 heads, D = 72. For each format of
``--formats`` (a recipe of that name: its casts of q, k, v and the probabilities), on the same
(B, L, H, D) bf16 q / k / v:

* ``cudnn_bf16`` / ``xla_bf16``: ``jax.nn.dot_product_attention`` without quantization (the baselines);
* ``explicit:<fmt>``: ``jdq.models.layers.attention`` under the recipe's plan with ``JDQ_QUANT_ATTENTION=xla``
  (logits and probabilities materialised, the probabilities' cast in XLA: what a step ran before);
* ``fused:<fmt>``: the same call with ``JDQ_QUANT_ATTENTION=kernel`` (q / k / v cast by XLA, the
  probabilities cast in the Mosaic GPU kernel);
* ``reference:<fmt>``: the same call with ``JDQ_QUANT_ATTENTION=reference`` (the fused path's q / k / v
  casts, then the op's XLA reference instead of the kernel);
* ``kernel_nocast``: the kernel on the bf16 q / k / v without a probability cast (its two-pass skeleton);
* ``kernel:<fmt>``: :func:`jdq.kernels.quant_attention.quant_attention` alone on already-cast operands
  (the layout changes and the kernel); ``kernel:<fmt>@<config>`` with a config of ``--configs``
  (``64s2``: block_kv 64, 2 stages) instead of the tuned one (a config that does not tile the shape fails
  rather than time the reference the op would fall back to).

Before timing, ``fused:<fmt>`` is checked against ``explicit:<fmt>`` on fresh inputs (the same function
up to the row sums' order: the share of equal outputs and ‖Δ‖/‖explicit‖, which must be far below the
cast's own error against float32 attention, or within the explicit path's own spread, below). XLA's compiled explicit path is not the program's rounding
for rounding: by default it may keep a bf16 value in float32 inside a fusion, and on a CPU it folds the
logits' bf16 rounding into the dot and divides by a reciprocal; so the check also compares with the
explicit path compiled under :data:`STRICT` (a failed check is reported and the variants still
timed). ``--diagnose FMTS`` locates a difference on a slice (:func:`diagnose`). Times: median of CUPTI-measured iterations
(``benchmarks/kernels.py``'s ``time_ms``). Results: ``quant_attention.json`` / ``.md`` under ``--out``
(default ``$OUT``, else ``benchmarks/results/latest``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernels as kb  # noqa: E402  (benchmarks/kernels.py: timing, output conventions)

SHAPES = {"dit.b64": (64, 256, 16, 72), "pixart": (2, 4096, 16, 72)}
TINY = {"tiny": (1, 128, 2, 72)}
DEFAULT_FORMATS = "mx6,mx9,mxfp8_e4m3,mxint8,w8a8-fp8attn"
SITE = "blocks.0.attn"


@contextlib.contextmanager
def quant_attention_env(choice):
    """``JDQ_QUANT_ATTENTION=choice`` while a function is traced (the path is chosen at trace time)."""
    from jdq.models.layers import QUANT_ATTENTION_ENV

    old = os.environ.get(QUANT_ATTENTION_ENV)
    os.environ[QUANT_ATTENTION_ENV] = choice
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(QUANT_ATTENTION_ENV)
        else:
            os.environ[QUANT_ATTENTION_ENV] = old


def qkv(key, shape):
    """One (q, k, v) bf16 set of ``shape`` (B, L, H, D)."""
    k1, k2, k3 = jax.random.split(key, 3)
    return tuple((jax.random.normal(kk, shape) * s).astype(jnp.bfloat16) for kk, s in ((k1, 1.5), (k2, 1.5), (k3, 1.0)))


def _attention(q, k, v, quant):
    from jdq.models.layers import attention

    return attention(q, k, v, site=SITE, quant=quant)


def bound_plan(fmt, example):
    """The recipe ``fmt``'s quantizer for one attention site traced on ``example`` (q, k, v)."""
    from jdq import recipes
    from jdq.quant import trace_operands

    plan = recipes.plan_for(fmt, trace_operands(_attention, *example))
    return plan.bind(plan.init())


def cast_operands(quant, q, k, v):
    """The plan's q̂ (B, H, Lq, D), k̂ᵀ (B, H, D, Lk), v̂ (B, H, Lk, D): what the kernel gets."""
    qh, kt, vh = jnp.swapaxes(q, 1, 2), jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2)
    return quant(qh, f"{SITE}.qk", "q", -1), quant(kt, f"{SITE}.qk", "k", -2), quant(vh, f"{SITE}.pv", "v", -2)


def parse_config(spec):
    """``"64s2"`` -> ``Config(block_kv=64, stages=2)`` (block_q is 64); trailing flags ``t``: ``split_tiles``, ``k``: ``keep_logits``, ``b``: ``batch_wgmma``, ``r``: ``sort_ranks``, ``p``: ``split_stream``."""
    import re

    from jdq.kernels.quant_attention.gpu import Config

    mt = re.fullmatch(r"(\d+)s(\d+)([tkbrp]*)", spec)
    if not mt or len(set(mt.group(3))) != len(mt.group(3)):
        raise SystemExit(f"--configs: cannot parse {spec!r} (e.g. 64s2: block_kv 64, 2 stages; 32s2t: a split's "
                         "pass 1 in 16-key tiles; 32s2tk: and pass 1's logits kept for pass 2; b: a step's logit "
                         "WGMMAs issued before one wait; r: a split's blocks ranked by a sorting network; p: a "
                         "split's pass 1 streamed in chunks)")
    flags = mt.group(3)
    return Config(block_kv=int(mt.group(1)), stages=int(mt.group(2)), split_tiles="t" in flags,
                  keep_logits="k" in flags, batch_wgmma="b" in flags, sort_ranks="r" in flags,
                  split_stream="p" in flags)


def variant(name, example, impl):
    """``(fn, args, env)`` of variant ``name`` (see the module docstring); ``env``: the JDQ_QUANT_ATTENTION to trace under.

    ``kernel:<fmt>@<config>`` runs the kernel with that config (:func:`parse_config`) instead of the tuned one.
    """
    from jdq.kernels.quant_attention import ProbCast, prob_cast_of, quant_attention

    d = example[0].shape[-1]
    scale = 1.0 / math.sqrt(d)
    name, _, spec = name.partition("@")
    config = parse_config(spec) if spec else None
    base, _, fmt = name.partition(":")
    if base == "kernel_nocast":  # the kernel's skeleton: bf16 operands, no probability cast
        q, k, v = example
        ops = (jnp.swapaxes(q, 1, 2), jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2))
        return (lambda qh, kt, vh: quant_attention(qh, kt, vh, prob=ProbCast(), scale=scale, impl=impl,
                                                   config=config)), ops, "kernel"
    if base in ("xla_bf16", "cudnn_bf16"):
        which = base.split("_")[0]
        return (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=which)), example, "xla"
    quant = bound_plan(fmt, example)
    if base in ("explicit", "fused", "reference"):
        env = {"explicit": "xla", "fused": "kernel", "reference": "reference"}[base]
        return (lambda q, k, v: _attention(q, k, v, quant)), example, env
    if base == "kernel":
        prob = prob_cast_of(quant.transform_for(f"{SITE}.pv", "attn_prob"))
        ops = jax.block_until_ready(jax.jit(lambda *a: cast_operands(quant, *a))(*example))
        ratio = quant.state_for(f"{SITE}.pv", "attn_prob")["ratio"] if prob.kind == "split" else None
        why = config and config.supports(ops[0].shape[2], ops[2].shape[2], -(-d // 16) * 16, prob)
        if why:  # the op would fall back to its XLA reference: say so rather than time that under the kernel's name
            raise ValueError(f"config {spec}: {why}")
        return (lambda qh, kt, vh: quant_attention(qh, kt, vh, ratio, prob=prob, scale=scale, impl=impl,
                                                   config=config)), ops, "kernel"
    raise ValueError(f"unknown variant {name!r}")


#: XLA options under which a compiled function keeps every rounding its program states: without them
#: XLA may skip a bf16 round trip inside a fusion (``xla_allow_excess_precision``, on by default).
STRICT = {"xla_allow_excess_precision": False}


def run_variant(name, example, impl, compiler_options=None):
    """``variant(name)``'s jitted function and arguments, traced under its ``JDQ_QUANT_ATTENTION``: ``(g, args)``.

    With ``compiler_options``, ``g`` is the function compiled with them (callable, not traceable).
    """
    fn, args, env = variant(name, example, impl)
    with quant_attention_env(env):
        g = jax.jit(fn)
        if compiler_options:
            g = g.lower(*args).compile(compiler_options=compiler_options)
        jax.block_until_ready(g(*args))  # traced here, under env (the trace is cached for later calls)
    return g, args


def check(fmt, example, impl):
    """``fused:<fmt>`` against ``explicit:<fmt>`` (as XLA compiles it by default, and :data:`STRICT`) and all against float32 attention.

    ``ok`` when the fused output is close to either explicit one (far below the cast's error) and as
    far from float32 attention as the explicit path is.
    """
    fused = run_variant(f"fused:{fmt}", example, impl)
    explicit = run_variant(f"explicit:{fmt}", example, impl)
    strict = run_variant(f"explicit:{fmt}", example, impl, STRICT)
    got, want, want_strict = (np.asarray(g(*a), np.float32) for g, a in (fused, explicit, strict))
    q, k, v = (x.astype(jnp.float32) for x in example)
    exact = np.asarray(jax.nn.dot_product_attention(q, k, v, scale=1 / math.sqrt(q.shape[-1]), implementation="xla"))
    rel, rel_strict = kb._rel(got, want), kb._rel(got, want_strict)
    err_explicit, err_fused = kb._rel(want, exact), kb._rel(got, exact)
    # the row sums run in another order than XLA's: a probability can move one float32 ulp, rarely across a
    # cast boundary; such flips are a small share of the cast's own error (interpret mode: 99 % equal outputs)
    # A per-row FP8 cast (a scale that is no power of two) moves with every bf16 rounding XLA keeps or drops:
    # on an H200 the explicit path compiled two ways differs by 3.1 % (w8a8-fp8attn, DiT b64). There the fused
    # path must lie within that spread of the explicit one.
    spread = kb._rel(want_strict, want)
    ok = (bool(np.isfinite(rel)) and min(rel, rel_strict) < max(0.05 * err_explicit, spread)
          and abs(err_fused - err_explicit) < 0.05 * err_explicit)
    return {"ok": ok, "equal_share": float(np.mean(got == want)), "relerr_vs_explicit": rel,
            "equal_share_strict": float(np.mean(got == want_strict)), "relerr_vs_strict": rel_strict,
            "strict_vs_explicit": spread, "explicit_relerr_vs_f32": err_explicit,
            "fused_relerr_vs_f32": err_fused}


def diagnose(fmt, example, heads=2):
    """Where fused and explicit differ, on a slice of ``heads`` heads of the first sample: equal-output shares.

    ``strict``: the explicit path compiled under :data:`STRICT`; ``interpret``: the kernel's code run as
    XLA ops on this device (Pallas interpret mode); ``cpu``: the explicit path on the host CPU. ``fused == interpret`` with ``explicit != fused`` puts the difference
    in XLA's compilation of the explicit path; ``interpret == explicit`` puts it in the kernel's compiled
    arithmetic.
    """
    from jdq.kernels.quant_attention import prob_cast_of, quant_attention

    q, k, v = (x[:1, :, :heads] for x in example)
    quant = bound_plan(fmt, (q, k, v))
    prob = prob_cast_of(quant.transform_for(f"{SITE}.pv", "attn_prob"))
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs = {"fused": run_variant(f"fused:{fmt}", (q, k, v), "gpu"), "explicit": run_variant(f"explicit:{fmt}", (q, k, v), "gpu"),
            "strict": run_variant(f"explicit:{fmt}", (q, k, v), "gpu", STRICT)}
    outs = {n: np.asarray(g(*a), np.float32) for n, (g, a) in outs.items()}
    ops = jax.jit(lambda *a: cast_operands(quant, *a))(q, k, v)
    outs["interpret"] = np.swapaxes(np.asarray(quant_attention(*ops, prob=prob, scale=scale, impl="gpu_interpret"),
                                               np.float32), 1, 2)
    cpu = jax.devices("cpu")[0]
    with quant_attention_env("xla"), jax.default_device(cpu):
        args = [jax.device_put(x, cpu) for x in (q, k, v)]
        quant_cpu = bound_plan(fmt, args)
        outs["cpu"] = np.asarray(jax.jit(lambda *a: _attention(*a, quant_cpu))(*args), np.float32)
    names = list(outs)
    return {f"{a}=={b}": float(np.mean(outs[a] == outs[b])) for i, a in enumerate(names) for b in names[i + 1:]}


def attention_flops(shape):
    """2 matmuls of 2·L²·D per (batch, head)."""
    b, l, h, d = shape
    return 4 * b * h * l * l * d


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-run", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (interpret mode, small shapes)")
    p.add_argument("--out", default=None)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--shapes", default="dit.b64,pixart", help=f"priority order, of {list(SHAPES)}")
    p.add_argument("--formats", default=DEFAULT_FORMATS, help="recipes whose attention is timed (MX / MX9-MX6-MX4 / FP8 rows)")
    p.add_argument("--configs", default="", help="extra kernel configs timed per format, e.g. 32s2,128s2 (block_kv, "
                   "stages; trailing flags t: a split's pass 1 in 16-key tiles, k: pass 1's logits kept for pass 2, "
                   "b: a step's logit WGMMAs issued before one wait, r: a split's blocks ranked by a sorting network, "
                   "p: a split's pass 1 streamed in chunks)")
    p.add_argument("--diagnose", default="", help="formats whose fused / explicit difference is located (see diagnose)")
    args = p.parse_args(argv)
    t0 = time.time()
    on_gpu = jax.default_backend() == "gpu"
    if args.device_run and not on_gpu:
        raise SystemExit("--device-run needs a GPU")
    if not args.device_run and not args.tiny:
        raise SystemExit("pass --device-run (on a GPU) or --tiny (CPU smoke run)")
    tiny = args.tiny or not on_gpu
    impl = "gpu" if on_gpu else "gpu_interpret"
    out_dir = args.out or kb.default_out()
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "quant_attention.json")
    shapes = TINY if tiny else {s: SHAPES[s] for s in args.shapes.split(",") if s}
    formats = [f for f in args.formats.split(",") if f]
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "argv": sys.argv[1:], "checks": {},
           "rows": {}}
    key = jax.random.key(int(time.time()) % 10000)  # fresh inputs every run

    def save(final=False):
        res["seconds"] = time.time() - t0
        kb.write_json(json_path, res)
        md = render(res)
        tmp = os.path.join(out_dir, "quant_attention.md.tmp")
        with open(tmp, "w") as f:
            f.write(md)
        os.replace(tmp, os.path.join(out_dir, "quant_attention.md"))
        if final:
            print(md)

    for tag, shape in shapes.items():
        example = qkv(jax.random.fold_in(key, len(res["rows"])), shape)
        row = res["rows"].setdefault(tag, {"shape": shape, "gflop": attention_flops(shape) / 1e9, "us": {},
                                           "errors": {}})
        names = (["cudnn_bf16", "xla_bf16"] if on_gpu else ["xla_bf16"]) + ["kernel_nocast"]  # cuDNN needs a GPU
        for fmt in formats:
            name = f"{tag}@{fmt}"
            if time.time() - t0 > args.budget_s:
                res["checks"][name] = {"ok": False, "error": "budget"}
                continue
            t1 = time.time()
            try:
                r = check(fmt, example, impl)
            except Exception as e:  # noqa: BLE001  (a format the kernel does not compile for)
                r = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            if on_gpu and fmt in args.diagnose.split(","):
                try:
                    r["diagnosis"] = diagnose(fmt, example)
                except Exception as e:  # noqa: BLE001
                    r["diagnosis"] = f"{type(e).__name__}: {str(e)[:300]}"
            r["seconds"] = round(time.time() - t1, 1)
            res["checks"][name] = r
            print(f"check {name:18s} " + "  ".join(f"{a}={b}" for a, b in r.items()), flush=True)
            save()
            # timed unless it could not run; a failed check is reported beside the times
            extra = [f"kernel:{fmt}@{c}" for c in args.configs.split(",") if c]
            names += [f"explicit:{fmt}"] if "error" in r else [f"fused:{fmt}", f"reference:{fmt}", f"kernel:{fmt}", *extra, f"explicit:{fmt}"]
        for name in names:
            if time.time() - t0 > args.budget_s:
                row["errors"][name] = "budget"
                continue
            try:
                g, a = run_variant(name, example, impl)
                ms = kb.time_ms(lambda *x: g(*x), [a], 1 if tiny else args.iters)
            except Exception as e:  # noqa: BLE001
                row["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"  {tag} {name} failed: {row['errors'][name]}", flush=True)
                continue
            row["us"][name] = ms * 1e3
            print(f"  {tag} {name}: {ms * 1e3:.1f} us  [{time.time() - t0:.0f}s]", flush=True)
            save()
    save(final=True)
    return 0


def render(res):
    """Markdown: the checks, then per shape each variant's µs, TFLOP/s and its speed against cuDNN bf16 and its explicit path."""
    lines = [f"jax {res['jax']}, {res['device']}", "", "| check | ok | facts |", "|---|---|---|"]
    for name, r in res["checks"].items():
        facts = ", ".join(f"{a}={b:.3g}" if isinstance(b, float) else f"{a}={b}" for a, b in r.items() if a != "ok")
        lines.append(f"| {name} | {r.get('ok')} | {facts} |")
    lines += ["", "| shape | variant | µs | TFLOP/s | × cuDNN bf16 | × its explicit path |", "|---|---|---:|---:|---:|---:|"]
    for tag, row in res["rows"].items():
        us = row["us"]
        for name, t in us.items():
            fmt = name.partition(":")[2].partition("@")[0]
            vs_cudnn = f"{us['cudnn_bf16'] / t:.2f}" if "cudnn_bf16" in us else "-"
            vs_explicit = f"{us[f'explicit:{fmt}'] / t:.2f}" if fmt and f"explicit:{fmt}" in us else "-"
            lines.append(f"| {tag} | {name} | {t:.1f} | {row['gflop'] / t * 1e3:.0f} | {vs_cudnn} | {vs_explicit} |")
        for name, err in row.get("errors", {}).items():
            lines.append(f"| {tag} | {name} | failed: {err[:160]} | | | |")
    lines += ["", "(× baseline = baseline time / variant time: above 1 the variant is faster.)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
