"""What each quantization recipe does to the embedded Animal-MNIST DiT's samples (CPU, one run).

::

    python benchmarks/quality.py                      # every recipe, writes benchmarks/results/quality.md
    python benchmarks/quality.py --recipes w8a8 mx6 --per-class 2 --steps 10 --out /tmp/q.md
    python benchmarks/quality.py --profile            # where mixdit's CPU time goes (prints only)

For the floating-point model and every recipe of :func:`jdq.recipes.names` it samples the same
class labels with the same seeds and the same sampler (default DDPM 50 steps, guidance 4,
``clip_denoised`` as the embedded model's ``sampling.json``; its own default is DDPM 100, which
is twice as slow) and reports, per row:

* **agreement**: the fraction of samples the embedded classifier labels with their conditioning
  class (the classifier and function ``jdq sample`` reports: :func:`jdq.demo.classifier.accuracy`),
  with its binomial standard error ``sqrt(p (1 - p) / n)``;
* **same label as FP**: the fraction of samples whose predicted label equals the label of the FP
  sample of the same seed (a paired measure, less noisy than the agreement);
* **PSNR** (dB) of each sample against the FP sample of the same seed, pixels mapped from
  ``[-1, 1]`` to ``[0, 1]`` (clipped; peak 1), the MSE pooled over every pixel of every sample
  compared; ``inf`` when identical;
* **mean |Δ|**: mean absolute pixel difference against the FP sample, in 8-bit levels (0..255);
* **wall s**: the recipe's whole cost on this machine (building the quantizer, calibration for a
  ``calibrated`` recipe, compilation and sampling), and **s / 100 samples** measured on the batches
  after the first (compiled), with its ratio to the FP row measured in the same run.

The quantizer is built as ``jdq sample --quant NAME`` builds it (``jdq.cli``): the recipe's plan
resolved against the traced operands of one denoiser call, calibrated recipes calibrated with the
FP sampler on the first 8 conditions with seed ``seed + 1``. Sample ``j`` uses the key
``fold_in(key(seed), j)`` (:func:`jdq.sampling.loop.sample_keys`), the same as ``jdq sample``.
The reference FP samples are drawn first; the ``fp`` row is a second FP run compared against them
(so its PSNR of ``inf`` is a measured determinism check; its compilation is cached from the
reference run). Rows listed in ``--reduced NAME=K`` sample only the first ``K`` per class (the
classes stay balanced) and are compared with the first FP samples of the same seeds.

The markdown file is written atomically (:func:`jdq.io.atomic_write_text`); text below the line
:data:`NOTES_MARKER` in an existing file (the hand-written interpretation) is kept.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdq.io import atomic_write_text  # noqa: E402

RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality.md")
NOTES_MARKER = "<!-- notes: text below this line is written by hand and kept by benchmarks/quality.py -->"
FP = "fp"


# ---------------------------------------------------------------------------- setup


def load_embedded():
    """``(model, sampling defaults, classifier params)`` of the embedded Animal-MNIST DiT."""
    import json

    from jdq.cli import DEFAULT_CLASSIFIER, DEFAULT_MODEL
    from jdq.demo import classifier as clf
    from jdq.models import load

    model, _ = load(DEFAULT_MODEL)
    defaults = json.loads((DEFAULT_MODEL / "sampling.json").read_text())
    return model, defaults, clf.load(DEFAULT_CLASSIFIER)


def training_agreement(sampler: str, steps: int, guidance: float) -> dict | None:
    """The FP agreement measured at training time for this sampler setting (``animal_training.json``), if any."""
    import json

    from jdq.cli import ASSETS

    try:
        entries = json.loads((ASSETS / "animal_training.json").read_text()).get("sample_accuracy", [])
    except (OSError, ValueError):
        return None
    return next((e for e in entries if e.get("sampler") == sampler and e.get("steps") == steps
                 and float(e.get("guidance", -1)) == float(guidance)), None)


def class_labels(num_classes: int, per_class: int) -> np.ndarray:
    """Labels ``0..K-1`` repeated ``per_class`` times, so every prefix of ``K·m`` labels is balanced."""
    return np.tile(np.arange(num_classes, dtype=np.int32), per_class)


def build_quantizer(model, name: str, sampler, labels, guidance: float, seed: int, calib_samples: int = 8):
    """The quantizer of recipe ``name``, built as ``jdq sample --quant name`` builds it."""
    from jdq import quant as Q
    from jdq import recipes
    from jdq.sampling.generate import Denoiser, guided_channels, null_condition, sample_shape
    from jdq.sampling.loop import collect_sampler_stats, sample_keys

    fn = Denoiser(model, model.family)
    x = jnp.zeros((1,) + sample_shape(model), jnp.float32)
    operands = Q.trace_operands(fn, model.params, x, jnp.zeros((1,), jnp.float32), jnp.asarray(labels[:1]))
    plan = recipes.plan_for(name, operands)
    stats = None
    if recipes.get(name).calibrated:
        n = max(1, min(calib_samples, len(labels)))
        uncond = null_condition(model, labels) if guidance != 1.0 else None
        _, stats = collect_sampler_stats(fn, model.params, sampler, jnp.asarray(labels[:n]), sample_keys(seed + 1, n),
                                         sample_shape(model), uncond=uncond, guidance=guidance,
                                         guided_channels=guided_channels(model))
    return plan.bind(plan.init(stats))


def sample_timed(model, labels, sampler, guidance: float, seed: int, batch_size: int, quant=None):
    """``(samples [N, H, W, C] numpy, seconds per batch)``: batches through the jitted sampler.

    Sample ``j`` uses ``sample_keys(seed, ...)[j]`` as in :func:`jdq.sampling.generate.generate`;
    the last batch is padded by repeating the last label (one compilation).
    """
    from jdq.sampling.generate import Denoiser, guided_channels, null_condition, sample_shape
    from jdq.sampling.loop import sample, sample_keys

    n = len(labels)
    bs = min(batch_size, n)
    fn = Denoiser(model, model.family)
    uncond = null_condition(model, labels) if guidance != 1.0 else None
    out, seconds = [], []
    for start in range(0, n, bs):
        idx = np.minimum(np.arange(start, start + bs), n - 1)
        t0 = time.perf_counter()
        x = sample(fn, model.params, sampler, jnp.asarray(labels[idx]), sample_keys(seed, bs, start),
                   sample_shape(model), uncond=uncond, guidance=guidance, guided_channels=guided_channels(model),
                   quant=quant)
        x = np.asarray(jax.block_until_ready(x))
        seconds.append(time.perf_counter() - t0)
        out.append(x[: min(bs, n - start)])
    return np.concatenate(out), seconds


# ---------------------------------------------------------------------------- metrics


def _unit(x):
    return np.clip((np.asarray(x, np.float64) + 1.0) / 2.0, 0.0, 1.0)


def psnr(samples, reference) -> float:
    """PSNR (dB, peak 1) of samples in ``[-1, 1]`` against ``reference``, MSE pooled; ``inf`` if equal."""
    mse = float(np.mean((_unit(samples) - _unit(reference)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def mean_abs_diff(samples, reference) -> float:
    """Mean absolute pixel difference in 8-bit levels (``[-1, 1]`` mapped to ``[0, 255]``)."""
    return float(np.mean(np.abs(_unit(samples) - _unit(reference))) * 255.0)


def _predict(clf_params, images, batch_size: int = 500):
    from jdq.demo import classifier as clf

    return np.concatenate([np.asarray(clf.predict(clf_params, images[s:s + batch_size]))
                           for s in range(0, len(images), batch_size)])


# ---------------------------------------------------------------------------- the benchmark


def run(names, *, sampler_name: str = "ddpm", steps: int = 50, guidance: float | None = None,
        per_class: int = 10, reduced: dict | None = None, batch_size: int = 25, seed: int = 0,
        model_bundle=None, log=print) -> tuple[list[dict], dict]:
    """Sample the FP reference, then each row of ``names`` (``"fp"`` or a recipe); ``(rows, info)``.

    Each row: ``name, n, agreement, agreement_se, same_label, psnr, mad, wall_s, steady_s_per_100``.
    ``reduced``: ``{name: per_class}`` for rows sampled with fewer seeds (at most ``per_class``).
    """
    from jdq import recipes
    from jdq.sampling.generate import resolve_sampler

    reduced = dict(reduced or {})
    unknown = [n for n in list(names) + list(reduced) if n != FP and n not in recipes.names()]
    if unknown:
        raise ValueError(f"unknown recipe {unknown[0]!r}; known: {FP}, {', '.join(recipes.names())}")
    for name, k in reduced.items():
        if not 1 <= k <= per_class:
            raise ValueError(f"--reduced {name}={k}: must lie in 1..{per_class} (--per-class)")
    model, defaults, clf_params = model_bundle or load_embedded()
    guidance = float(defaults.get("guidance", 4.0) if guidance is None else guidance)
    sampler = resolve_sampler(model, sampler_name, steps, clip_denoised=bool(defaults.get("clip_denoised", False)))
    k = model.config.num_classes
    labels = class_labels(k, per_class)

    def steady(seconds, n_per_batch):
        rest = seconds[1:]
        return 100.0 * sum(rest) / (n_per_batch * len(rest)) if rest else float("nan")

    log(f"reference: FP, {len(labels)} samples, {sampler.kind} {sampler.num_steps} steps, guidance {guidance:g}")
    t0 = time.perf_counter()
    ref, ref_seconds = sample_timed(model, labels, sampler, guidance, seed, batch_size)
    info = dict(sampler=sampler.kind, steps=sampler.num_steps, guidance=guidance, clip_denoised=sampler.clip_denoised,
                per_class=per_class, batch_size=batch_size, seed=seed, num_classes=k,
                default_sampling=f"{str(defaults.get('sampler', '?')).upper()} {defaults.get('steps', '?')} steps, "
                                 f"guidance {defaults.get('guidance', '?')}",
                training_agreement=training_agreement(sampler.kind, sampler.num_steps, guidance),
                reference_wall_s=time.perf_counter() - t0, reference_first_batch_s=ref_seconds[0])
    ref_pred = _predict(clf_params, ref)

    rows = []
    for name in names:
        m = reduced.get(name, per_class) * k
        lab = labels[:m]
        t0 = time.perf_counter()
        quant = None if name == FP else build_quantizer(model, name, sampler, lab, guidance, seed)
        build_s = time.perf_counter() - t0
        x, seconds = sample_timed(model, lab, sampler, guidance, seed, batch_size, quant)
        wall = time.perf_counter() - t0
        pred = _predict(clf_params, x)
        p = float(np.mean(pred == lab))
        row = dict(name=name, n=m, agreement=p, agreement_se=math.sqrt(p * (1 - p) / m),
                   same_label=float(np.mean(pred == ref_pred[:m])), psnr=psnr(x, ref[:m]),
                   mad=mean_abs_diff(x, ref[:m]), wall_s=wall, build_s=build_s,
                   steady_s_per_100=steady(seconds, min(batch_size, m)))
        rows.append(row)
        log(f"{name:12s} n={m:4d} agreement {p:6.1%}  PSNR {row['psnr']:6.2f} dB  |Δ| {row['mad']:6.2f}  "
            f"wall {wall:6.1f}s (build {build_s:.1f}s)  {row['steady_s_per_100']:.1f} s/100")
    return rows, info


# ---------------------------------------------------------------------------- report


def _fmt_psnr(v):
    return "∞" if math.isinf(v) else f"{v:.2f}"


def table(rows) -> str:
    """The markdown table of ``rows`` (speed ratios against the ``fp`` row when present)."""
    base = next((r["steady_s_per_100"] for r in rows if r["name"] == FP), float("nan"))
    from jdq import recipes

    lines = ["| recipe | samples | agreement with class | same label as FP | PSNR vs FP (dB) | mean \\|Δ\\| vs FP "
             "(8-bit levels) | wall s | s / 100 samples | × FP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = "FP (float32)" if r["name"] == FP else f"`{r['name']}`"
        if r["name"] != FP and recipes.get(r["name"]).calibrated:
            label += " (calibrated)"
        ratio = r["steady_s_per_100"] / base if base == base and base > 0 else float("nan")
        lines.append(f"| {label} | {r['n']} | {r['agreement']:.1%} ± {r['agreement_se']:.1%} | {r['same_label']:.1%} | "
                     f"{_fmt_psnr(r['psnr'])} | {r['mad']:.2f} | {r['wall_s']:.1f} | {r['steady_s_per_100']:.1f} | "
                     f"{ratio:.2f} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(rows, info, command: str, total_s: float, load_before, load_after) -> str:
    """The markdown results page (without the hand-written notes)."""
    counts = sorted({r["n"] for r in rows}, reverse=True)
    reduced = [f"`{r['name']}` {r['n']}" for r in rows if r["n"] != counts[0]]
    return "\n".join([
        "# Quantization recipes on the embedded Animal-MNIST DiT: sample quality (CPU)",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()}: {_cpu_name()}, "
        f"{os.cpu_count()} cores, {platform.system()} {platform.machine()}, jax {jax.__version__} "
        f"(backend {jax.default_backend()}); load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        f"(other processes may share the cores). Whole run: {total_s:.0f} s.",
        "",
        f"Sampler: {info['sampler'].upper()} {info['steps']} steps, guidance {info['guidance']:g}, "
        f"clip_denoised {info['clip_denoised']} (the embedded model's default: {info['default_sampling']}). "
        + (f"At training time (`jdq/assets/animal_training.json`) the FP model's agreement with this sampler was "
           f"{info['training_agreement']['accuracy']:.1%} on {info['training_agreement']['samples']} samples. "
           if info.get("training_agreement") else "")
        + f"Classes 0–{info['num_classes'] - 1}, "
        f"{info['per_class']} per class = {counts[0]} samples per row"
        + (f" (fewer, still balanced over the classes, for: {', '.join(reduced)})" if reduced else "")
        + f"; seeds: sample j uses fold_in(key({info['seed']}), j) in every row; batches of {info['batch_size']} "
          f"(× 2 with guidance) through the jitted `lax.scan` sampler.",
        "",
        "Agreement: the embedded classifier's label equals the conditioning class (± binomial standard error). "
        "Same label as FP: the label equals that of the FP sample of the same seed. PSNR (peak 1, pixels in [0, 1], "
        "MSE pooled over all samples) and mean |Δ| compare each sample with the FP sample of the same seed. "
        "Wall s: building the quantizer (calibration included), compiling and sampling the row; "
        "s / 100 samples: the batches after the first (compiled), × FP: its ratio to the FP row. "
        f"The FP row is a second FP run (its compilation was in the reference run: {info['reference_wall_s']:.1f} s "
        f"wall, first batch {info['reference_first_batch_s']:.1f} s).",
        "",
        table(rows),
        "",
    ])


def kept_notes(path) -> str:
    """The hand-written notes below :data:`NOTES_MARKER` in an existing results file ('' if none)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    return text.split(NOTES_MARKER, 1)[1].lstrip("\n") if NOTES_MARKER in text else ""


# ---------------------------------------------------------------------------- profile


def profile(batch: int = 25, reps: int = 5) -> str:
    """Markdown: one guided denoiser call (``2·batch`` rows) per quantizer variant, and the ranking op.

    Variants separate mixdit's two extra costs over ``mx6``: the block ranking of
    :func:`jdq.quant.outliers.outlier_mask` (two stable argsorts per operand) and the second cast.
    """
    from jdq import formats as F
    from jdq import quant as Q
    from jdq import recipes
    from jdq.quant import outliers as O
    from jdq.recipes import BLOCKS, LINEAR_ACTS
    from jdq.sampling.generate import Denoiser

    model, _, _ = load_embedded()
    fn = Denoiser(model, model.family)
    b = 2 * batch
    x = jax.random.normal(jax.random.key(0), (b, 28, 28, 1))
    t = jnp.full((b,), 500.0)
    y = jnp.arange(b, dtype=jnp.int32) % (model.config.num_classes + 1)
    operands = Q.trace_operands(fn, model.params, x[:1], t[:1], y[:1])

    def quantizer(rules):
        plan = Q.resolve(list(rules) + [Q.keep_float("*")], operands)
        return plan.bind(plan.init(None))

    def ranked_single_cast(ratio):  # the mask is computed, but only one (mx6) cast
        meta = O.outlier_split(ratio).meta

        def apply(v, state, ctx):
            mask = O.outlier_mask(meta, v, {"ratio": jnp.float32(ratio)}, ctx.axis)
            return jnp.where(mask, v, F.cast(v, "mx6", axis=ctx.axis))
        return Q.QuantTransform(lambda stats: (), apply)

    def fixed_mask_two_casts(ratio):  # both casts, the mask = the first block (no ranking)
        meta = O.outlier_split(ratio).meta

        def apply(v, state, ctx):
            axis = ctx.axis % v.ndim
            idx = jnp.arange(v.shape[axis]).reshape([-1 if d == axis else 1 for d in range(v.ndim)])
            return O._split_cast(v, jnp.broadcast_to(idx < 16, v.shape), meta, axis)
        return Q.QuantTransform(lambda stats: (), apply)

    weights = Q.rule(BLOCKS, Q.cast("mx6"), roles=("weight",))

    def split_rules(make):
        return [weights, Q.rule(BLOCKS, make(0.05), roles=LINEAR_ACTS), Q.rule(BLOCKS, make(0.2), roles=Q.ATTENTION_ROLES)]

    variants = [
        ("FP", None),
        ("`w8a8`", quantizer(recipes.get("w8a8").rules())),
        ("`mxfp8_e4m3`", quantizer(recipes.get("mxfp8_e4m3").rules())),
        ("`mx6`", quantizer(recipes.get("mx6").rules())),
        ("`mixdit`", quantizer(recipes.get("mixdit").rules())),
        ("mixdit, ranking + one mx6 cast (no mx9 cast)", quantizer(split_rules(ranked_single_cast))),
        ("mixdit, mx9 + mx6 casts, fixed mask (no ranking)", quantizer(split_rules(fixed_mask_two_casts))),
    ]

    def bench(f, *args):
        jax.block_until_ready(f(*args))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts))

    fwd = jax.jit(lambda p, x, t, y, q: fn(p, x, t, y, quant=q))
    lines = [f"One denoiser call, batch {b} (= {batch} samples with guidance), median of {reps}:", "",
             "| quantizer | ms / call | × FP |", "|---|---:|---:|"]
    base = None
    for label, q in variants:
        ms = bench(fwd, model.params, x, t, y, q)
        base = base or ms
        lines.append(f"| {label} | {ms:.0f} | {ms / base:.2f} |")

    def pairwise_ranks(v):  # rank by decreasing value, ties by position: O(n²) compares, no sort
        i = jnp.arange(v.shape[-1])
        before = (v[..., None, :] > v[..., :, None]) | ((v[..., None, :] == v[..., :, None]) & (i < i[:, None]))
        return before.sum(-1)

    rows = b * (28 // model.config.patch_size) ** 2
    width = int(model.config.hidden_size * model.config.mlp_ratio)
    a = jax.random.normal(jax.random.key(1), (rows, width))
    mag = jnp.abs(a).reshape(rows, width // 16, 16).max(-1)
    meta = O.outlier_split(0.05).meta
    st = {"ratio": jnp.float32(0.05)}
    same = bool(jnp.all(pairwise_ranks(mag) == O._ranks(mag)))
    lines += ["", f"The fc2 input (`post_gelu`, {rows}×{width}, {width // 16} blocks of 16 per row), median of {reps}:",
              "", "| op | ms |", "|---|---:|"]
    for label, f, arg in [
        ("`F.cast(x, 'mxfp8_e4m3')`", jax.jit(lambda v: F.cast(v, "mxfp8_e4m3")), a),
        ("`F.cast(x, 'mx6')`", jax.jit(lambda v: F.cast(v, "mx6")), a),
        ("`F.cast(x, 'mx9')`", jax.jit(lambda v: F.cast(v, "mx9")), a),
        ("`outlier_mask` (block max + ranks)", jax.jit(lambda v: O.outlier_mask(meta, v, st)), a),
        ("`outliers._ranks` of the block maxima (2 stable argsorts)", jax.jit(O._ranks), mag),
        (f"pairwise-compare ranks of the block maxima (equal to `_ranks`: {same})", jax.jit(pairwise_ranks), mag),
    ]:
        lines.append(f"| {label} | {bench(f, arg):.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def _parse_reduced(items):
    out = {}
    for item in items or []:
        name, sep, k = item.partition("=")
        if not sep or not k.isdigit():
            raise SystemExit(f"--reduced expects NAME=PER_CLASS (e.g. mixdit=5), got {item!r}")
        out[name] = int(k)
    return out


def main(argv=None) -> int:
    """Run the benchmark (or ``--profile``), print the table and write the results file."""
    from jdq import recipes

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=None, help="rows besides FP (default: every recipe)")
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None, help="default: the embedded model's (4)")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--reduced", nargs="*", default=[], metavar="NAME=K",
                   help="rows sampled with only K per class (e.g. mixdit=5, the slow one on CPU; default: none)")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=RESULTS_MD)
    p.add_argument("--profile", action="store_true", help="only time mixdit's parts against mx6 and FP (prints)")
    args = p.parse_args(argv)
    if args.profile:
        print(profile())
        return 0
    names = [FP] + list(args.recipes or recipes.names())
    reduced = {k: v for k, v in _parse_reduced(args.reduced).items() if k in names}
    command = "python benchmarks/quality.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                  if (argv if argv is not None else sys.argv[1:]) else "")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows, info = run(names, sampler_name=args.sampler, steps=args.steps, guidance=args.guidance,
                     per_class=args.per_class, reduced=reduced, batch_size=args.batch_size, seed=args.seed,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    text = report(rows, info, command, time.perf_counter() - t0, load_before, os.getloadavg())
    print(text)
    notes = kept_notes(args.out)
    atomic_write_text(args.out, text + "\n" + NOTES_MARKER + "\n\n" + notes, parents=True)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
