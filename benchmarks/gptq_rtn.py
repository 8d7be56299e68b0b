"""GPTQ against round-to-nearest on every linear layer of the embedded Animal-MNIST DiT (CPU, one run).

::

    python benchmarks/gptq_rtn.py                 # prints the table, writes benchmarks/results/gptq_rtn.md
    python benchmarks/gptq_rtn.py --calib 32 --out /tmp/g.md

Calibration: ``--calib`` Animal-MNIST images noised to ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε`` at uniform
random timesteps (DiT's linear schedule), with their labels; each linear layer's real input over all
their tokens gives ``H = 2 XᵀX``. The error is measured on as many *other* images (held out):
``‖X Ŵ − X W‖² / ‖X W‖²`` of the layer output, per layer, for RTN (``jdq.formats.cast``) and GPTQ
(:func:`jdq.quant.gptq`, damping 0.01, block 128) at the same format. The table gives, per setting,
the geometric mean over layers of GPTQ/RTN, its worst layer, and the number of layers GPTQ improves.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gptq_rtn.md")
SETTINGS = [  # label, format, options, act_order
    ("W4 g32", "int4", dict(granularity="group", group_size=32), False),
    ("W4 g32 act-order", "int4", dict(granularity="group", group_size=32), True),
    ("W4 g128", "int4", dict(granularity="group", group_size=128), False),
    ("W4 per-channel", "int4", dict(granularity="row"), False),
    ("W4 per-channel act-order", "int4", dict(granularity="row"), True),
    ("W3 g32", "int3", dict(granularity="group", group_size=32), False),
]


def layer_inputs(model, n, seed):
    """``{site: (n, tokens, in)}``: every linear layer's input on ``n`` noised Animal-MNIST images."""
    from jdq import quant as Q
    from jdq.demo.data import load_animal_mnist, to_model_range
    from jdq.sampling.schedules import alphas_cumprod, dit_betas

    images, labels = load_animal_mnist()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), n, replace=False)
    x0 = to_model_range(images[idx])
    t = rng.integers(0, 1000, n)
    ac = alphas_cumprod(dit_betas(1000))[t].astype(np.float32)[:, None, None, None]
    x_t = np.sqrt(ac) * x0 + np.sqrt(1 - ac) * rng.standard_normal(x0.shape).astype(np.float32)
    _, stats = Q.collect_stats(model.apply, model.params, jnp.asarray(x_t, jnp.float32), jnp.asarray(t),
                               jnp.asarray(labels[idx]), stat_fn=lambda x, axis: {"x": x}, roles=Q.ACTIVATION_ROLES)
    return {k.split(":")[0]: np.asarray(s["x"]).reshape(n, -1, s["x"].shape[-1]) for k, s in stats.items()}


def main(argv=None) -> int:
    """Measure and print the table (and write it unless ``--out ''``)."""
    import jdq
    from jdq import formats
    from jdq.io import atomic_write_text
    from jdq.quant import gptq

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=32, help="calibration images (and as many held out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=RESULTS_MD, help="markdown file to write ('' to only print)")
    args = ap.parse_args(argv)

    model, _ = jdq.models.load(os.path.join(os.path.dirname(jdq.__file__), "assets", "animal_dit"))
    inputs = layer_inputs(model, 2 * args.calib, args.seed)
    sites = [s for s in inputs if s.startswith("blocks.") and s.split(".")[-1] in ("qkv", "proj", "fc1", "fc2")]

    def kernel(site):
        p = model.params
        for part in site.split("."):
            p = p[int(part) if part.isdigit() else part]
        return np.asarray(p["kernel"])

    def err(X, W, Wq):
        ref = X @ W
        return float(np.sum((X @ Wq - ref) ** 2) / np.sum(ref**2))

    rows, per_layer = [], []
    for label, fmt, opts, act_order in SETTINGS:
        ratios = []
        for site in sites:
            W = kernel(site).astype(np.float64)
            X = inputs[site][: args.calib].reshape(-1, W.shape[0]).astype(np.float64)
            Xh = inputs[site][args.calib:].reshape(-1, W.shape[0]).astype(np.float64)
            H = jnp.asarray(2.0 * X.T @ X, jnp.float32)
            w32 = jnp.asarray(W, jnp.float32)
            rtn = np.asarray(formats.cast(w32, fmt, axis=-2, **opts), np.float64)
            q = np.asarray(gptq(w32, H, fmt, act_order=act_order, **opts).weight, np.float64)
            e_rtn, e_gptq = err(Xh, W, rtn), err(Xh, W, q)
            ratios.append(e_gptq / e_rtn)
            per_layer.append((label, site, e_rtn, e_gptq))
        r = np.asarray(ratios)
        rows.append((label, float(np.exp(np.mean(np.log(r)))), float(r.max()), int(np.sum(r < 1)), len(r)))

    lines = [
        "# GPTQ vs round-to-nearest, embedded Animal-MNIST DiT",
        "",
        f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
        f"`python benchmarks/gptq_rtn.py --calib {args.calib} --seed {args.seed}`: H from {args.calib} noised images, "
        f"error on {args.calib} others (relative layer-output error ‖XŴ − XW‖² / ‖XW‖²).",
        "",
        "| setting | GPTQ / RTN (geo. mean) | worst layer | layers improved |",
        "|---|---|---|---|",
    ]
    lines += [f"| {lab} | {g:.3f} | {w:.3f} | {k}/{n} |" for lab, g, w, k, n in rows]
    lines += ["", "| setting | layer | RTN | GPTQ |", "|---|---|---|---|"]
    lines += [f"| {lab} | {site} | {a:.3e} | {b:.3e} |" for lab, site, a, b in per_layer if lab == "W4 g32"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
