"""``jdq sensitivity``: per-layer, per-bit-width sensitivity of a DiT or a text-to-image pipeline, as JSON and a bar chart.

Each unit (one linear layer with ``--recipe mixdq``, one block's attention / cross-attention /
FFN group with ``--recipe vidit-q``) is quantized alone at each candidate bit width, its weights
and its input activations separately, and the samples are compared with the floating-point
samples of the same noise: SSIM of the images for content units (FFN, cross-attention), SQNR of
the output for quality units (the rest) — MixDQ's metric decoupling (:mod:`jdq.quant.sensitivity`).
Both metrics are stored for every unit; ``metric`` names the one the allocation uses.

Models: a class-conditional DiT folder (default: the embedded model; classes in turn), or a
converted PixArt-Σ / SD3 pipeline folder with ``--prompts FILE`` (one prompt per line, used in
turn for the ``--samples`` samples; negative prompt ``""`` under guidance, as ``jdq sample``): the
transformer is swept, the text encoders run in floating point, SQNR is taken on the latents and
SSIM on the VAE-decoded images.

``--time-groups G`` splits the sampler's steps into ``G`` groups of consecutive steps (ViDiT-Q: 4
groups of its 20 steps) and measures every unit in every group separately (quantized during that
group's steps only): units are then named ``"<unit>@t<g>"`` with ``time_group`` and ``steps``.

``DIR/sensitivity.json`` is rewritten atomically after every measurement, so an interrupted run
continues where it stopped (same settings required); ``DIR/sensitivity.png`` is drawn at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jdq.cli._common import COMMANDS, CliError

NAME = "sensitivity"
HELP = COMMANDS[NAME][1]

#: Sweep settings of each paper's recipe: units, bit widths, activation granularity.
SWEEPS = {
    "mixdq": dict(by="layer", weight_bits=(2, 4, 8), act_bits=(4, 8), act_granularity="tensor"),
    "vidit-q": dict(by="group", weight_bits=(4, 6, 8), act_bits=(4, 6, 8), act_granularity="row"),
}
RESULTS = "sensitivity.json"
CHART = "sensitivity.png"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``sensitivity`` sub-command; return its parser."""
    p = subparsers.add_parser(NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="a class-conditional DiT folder or a PixArt-Σ / SD3 pipeline folder (with --prompts); "
                        "default: the embedded Animal-MNIST DiT")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts of a pipeline folder, one per line (used in turn for the samples)")
    p.add_argument("--recipe", required=True, choices=sorted(SWEEPS), help="whose sweep: units, bit widths, activations")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (sensitivity.json, sensitivity.png)")
    p.add_argument("--samples", type=int, default=20, help="samples per measurement (classes in turn; default 20)")
    p.add_argument("--sampler", default=None, help="ddpm, ddim, dpm++2m or euler (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--time-groups", type=int, default=None, metavar="G",
                   help="measure every unit in each of G groups of consecutive steps separately (ViDiT-Q: 4)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration samples for static activations")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the compared samples")
    p.add_argument("--by", choices=("layer", "group"), default=None, help="override the recipe's unit")
    p.add_argument("--weight-bits", type=int, nargs="+", default=None, help="override the weight bit widths")
    p.add_argument("--act-bits", type=int, nargs="+", default=None, help="override the activation bit widths")
    p.add_argument("--only", nargs="+", default=None, metavar="GLOB",
                   help="measure only the units matching these globs (e.g. 'blocks.0*')")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG")
    return p


def _settings(args, model_folder, sampler_name, steps, guidance, prompts=None) -> dict:
    sweep = dict(SWEEPS[args.recipe])
    if args.by is not None:
        sweep["by"] = args.by
    if args.weight_bits is not None:
        sweep["weight_bits"] = tuple(args.weight_bits)
    if args.act_bits is not None:
        sweep["act_bits"] = tuple(args.act_bits)
    return {"model": str(Path(model_folder).resolve()), "recipe": args.recipe, "samples": args.samples,
            "sampler": sampler_name, "steps": steps, "guidance": guidance, "seed": args.seed,
            "calib_samples": args.calib_samples, "only": args.only,
            **({} if args.time_groups is None else {"time_groups": args.time_groups}),
            **({} if prompts is None else {"prompts": list(prompts)}),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in sweep.items()}}


def _load_previous(path: Path, settings: dict) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CliError(f"{path} exists but is not valid JSON ({e}); move it away to start over") from None
    if data.get("settings") != settings:
        diff = sorted(k for k in set(settings) | set(data.get("settings", {}))
                      if settings.get(k) != data.get("settings", {}).get(k))
        raise CliError(f"{path} holds a run with other settings ({', '.join(diff)}); use another --out or the same "
                       "settings to resume")
    return data.get("units", {})


def chart(results: dict, path: Path, title: str) -> Path:
    """Bar chart: a panel per (side, metric), units along x, one bar per bit width; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from jdq.io import atomic_write

    panels = [(side, metric) for side in ("weight", "act") for metric in ("sqnr", "ssim")
              if any(u["metric"] == metric and u.get(side) for u in results.values())]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.35 * len(results) + 2), 2.8 * len(panels)),
                             squeeze=False)
    for ax, (side, metric) in zip(axes[:, 0], panels):
        names = [n for n, u in results.items() if u["metric"] == metric and u.get(side)]
        bits = sorted({int(b) for n in names for b in results[n][side]})
        width = 0.8 / max(len(bits), 1)
        for j, b in enumerate(bits):
            vals = [results[n][side].get(str(b), {}).get(metric, np.nan) for n in names]
            vals = [np.nan if v is None else (max(1.0 - v, 1e-6) if metric == "ssim" else min(v, 99.0)) for v in vals]
            ax.bar(np.arange(len(names)) + (j - (len(bits) - 1) / 2) * width, vals, width, label=f"{b} bits")
        ax.set_xticks(np.arange(len(names)), names, rotation=90, fontsize=6)
        ax.set_ylabel("SQNR (dB), higher: less sensitive" if metric == "sqnr" else "1 − SSIM, lower: less sensitive",
                      fontsize=7)
        if metric == "ssim":
            ax.set_yscale("log")
        ax.set_title(f"{side}s, {'quality' if metric == 'sqnr' else 'content'} units", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _conditions(args, folder, samples):
    """``(model, defaults, cond, uncond_or_None_maker, decode, prompts)`` of a DiT or a pipeline folder."""
    from jdq.sampling.pipelines import is_pipeline_folder

    if args.model is not None and Path(args.model).is_dir() and is_pipeline_folder(args.model):
        if args.prompts is None:
            raise CliError(f"{args.model} is a text-to-image pipeline: give --prompts FILE (one prompt per line)")
        from jdq.cli.encode_prompts import read_prompts
        from jdq.cli.sample_text import load_pipeline

        prompts = read_prompts(args.prompts)
        pipe = load_pipeline(args.model)
        prompts = [prompts[j % len(prompts)] for j in range(samples)]
        cond = pipe.encode(prompts)
        return pipe.transformer, dict(pipe.defaults), cond, (lambda: pipe.encode([""], "negative prompt")), \
            pipe.decode, prompts
    if args.prompts is not None:
        raise CliError("--prompts applies to a text-to-image pipeline folder (with pipeline.json)")
    from jdq.cli.sample import _resolve_model
    from jdq.models.spec import find_spec

    folder, model, defaults = _resolve_model(args.model)
    spec = find_spec(model)
    if spec is None or not spec.class_conditional or not model.config.num_classes:
        raise CliError(f"jdq sensitivity samples class-conditional DiTs or text-to-image pipeline folders (with "
                       f"--prompts); {folder} is a {model.family} model")
    import jax.numpy as jnp
    import numpy as np

    from jdq.sampling.generate import null_condition

    k = model.config.num_classes
    labels = jnp.asarray(np.tile(np.arange(k, dtype=np.int32), -(-samples // k))[:samples])
    decode = None if not bool(defaults.get("pixel_space", True)) else (lambda x: x)
    return model, defaults, labels, (lambda: null_condition(model, labels)), decode, None


def run(args) -> int:
    """``jdq sensitivity``: validate, sample FP once, then every unit × side × bit width (× time group; resumable)."""
    for name in ("samples", "calib_samples"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    if args.time_groups is not None and args.time_groups < 1:
        raise CliError(f"--time-groups must be >= 1, got {args.time_groups}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")

    folder = Path(args.model) if args.model is not None else None
    model, defaults, cond, make_uncond, decode, prompts = _conditions(args, folder, args.samples)
    if folder is None:
        from jdq.cli._common import DEFAULT_MODEL

        folder = DEFAULT_MODEL

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdq import quant as Q
    from jdq.quant import sensitivity as S
    from jdq.io import atomic_write_text
    from jdq.metrics.paired import ssim
    from jdq.sampling import SAMPLERS
    from jdq.sampling.generate import Denoiser, guided_channels, resolve_sampler, sample_shape
    from jdq.sampling.images import to_uint8
    from jdq.sampling.loop import collect_sampler_stats, sample, sample_keys

    name = args.sampler or defaults.get("sampler")
    if name is not None and name not in SAMPLERS + ("dpm-solver++", "dpmpp2m", "flow-euler"):
        raise CliError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
    try:
        sampler = resolve_sampler(model, name, args.steps or defaults.get("steps"), shift=defaults.get("shift"),
                                  clip_denoised=bool(defaults.get("clip_denoised", False)))
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.time_groups is not None and args.time_groups > sampler.num_steps:
        raise CliError(f"--time-groups {args.time_groups} exceeds the sampler's {sampler.num_steps} steps")
    groups = None if args.time_groups is None else S.contiguous_groups(sampler.num_steps, args.time_groups)
    guidance = float(args.guidance if args.guidance is not None else defaults.get("guidance", 1.0))
    settings = _settings(args, folder, sampler.kind, sampler.num_steps, guidance, prompts)
    try:
        spec = S.SweepSpec(tuple(settings["weight_bits"]), tuple(settings["act_bits"]), settings["act_granularity"],
                           settings["by"])
    except ValueError as e:
        raise CliError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    done = _load_previous(path, settings)

    try:
        uncond = make_uncond() if guidance != 1.0 else None
    except ValueError as e:
        raise CliError(str(e)) from None
    fn = Denoiser(model, model.family)
    shape = sample_shape(model)
    kw = dict(uncond=uncond, guidance=guidance, guided_channels=guided_channels(model))
    keys = sample_keys(args.seed, args.samples)

    def draw(quant=None):
        return np.asarray(sample(fn, model.params, sampler, cond, keys, shape, quant=quant, **kw))

    first = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[:1]), cond)
    operands = Q.trace_operands(fn, model.params, jnp.zeros((1,) + shape), jnp.zeros((1,)), first)
    unit_sites = S.units(operands, spec.by)
    if not unit_sites:
        raise CliError(f"{folder}: no linear layer inside transformer blocks to measure")
    if args.only:
        import fnmatch

        unit_sites = {n: s for n, s in unit_sites.items() if any(fnmatch.fnmatchcase(n, g) for g in args.only)}
        if not unit_sites:
            raise CliError(f"--only {' '.join(args.only)} matches no unit; units are named like "
                           f"{', '.join(list(S.units(operands, spec.by))[:3])}")
    t0 = time.time()
    fp = draw()
    fp_img = None if decode is None else to_uint8(decode(fp))
    stats = None
    if spec.calibrated:
        n = min(args.calib_samples, args.samples)
        sub = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[:n]), cond)
        _, stats = collect_sampler_stats(fn, model.params, sampler, sub, sample_keys(args.seed + 1, n), shape, **kw)
    sizes = {o.site: int(np.prod(o.shape)) for o in operands if o.role == "weight"}
    act_sizes = {o.site: int(np.prod(o.shape[1:])) for o in operands if o.role in Q.ACTIVATION_ROLES}

    # measured entries: (result name, unit, time group or None)
    entries = [(n, n, None) for n in unit_sites] if groups is None else \
        [(f"{n}@t{g}", n, g) for n in unit_sites for g in range(groups.num_groups)]
    results = {name: done.get(name, {}) for name, _, _ in entries}
    for name, unit, g in entries:
        sites = unit_sites[unit]
        group = S.unit_group(unit)
        results[name].update(group=group, metric=S.metric_of(group), sites=list(sites),
                             weight_size=sum(sizes[s] for s in sites), act_size=sum(act_sizes.get(s, 0) for s in sites))
        if g is not None:
            results[name].update(unit=unit, time_group=g,
                                 steps=[int(i) for i in np.flatnonzero(groups.index_np(np.arange(sampler.num_steps)) == g)])

    def save():
        data = {"settings": settings, "units": results}
        atomic_write_text(path, json.dumps(data, indent=1, allow_nan=True) + "\n")

    total = len(entries) * (len(spec.weight_bits) + len(spec.act_bits))
    measured = 0
    for side, bit_list in (("weight", spec.weight_bits), ("act", spec.act_bits)):
        for bits in bit_list:
            todo = [e for e in entries if str(bits) not in results[e[0]].get(side, {})]
            if not todo:
                continue
            plan = S.sweep_plan(operands, spec, side, bits, groups)
            base = plan.init(stats)
            for name, unit, g in todo:
                got = draw(plan.bind(S.switch_on(plan, base, unit_sites[unit], g)))
                entry = {"sqnr": S.sqnr(fp, got)}
                if fp_img is not None:
                    entry["ssim"] = ssim(fp_img, to_uint8(decode(got)))
                results[name].setdefault(side, {})[str(bits)] = entry
                save()
                measured += 1
                print(f"[{measured}/{total}] {name} {side} int{bits}: SQNR {entry['sqnr']:.2f} dB"
                      + (f", SSIM {entry['ssim']:.4f}" if fp_img is not None else ""), file=sys.stderr)
    save()
    print(f"jdq sensitivity: {len(entries)} units, {measured} new measurements in {time.time() - t0:.0f} s -> {path}",
          file=sys.stderr)
    if not args.no_chart:
        chart(results, out / CHART, f"{args.recipe} sensitivity, {Path(folder).name}, {args.samples} samples, "
                                    f"{sampler.num_steps} steps")
    return 0
