"""``jdq quantize``: calibrate a recipe on a model and write the quantized model to a folder.

``jdq quantize --recipe ptq4dit --out q/ptq4dit`` quantizes the embedded Animal-MNIST DiT with
PTQ4DiT (calibrated along the FP sampler's trajectories of ``--calib-samples`` class labels, the
classes in turn) and writes ``q/ptq4dit``: the recipe and its options, the calibrated state
(safetensors), the calibration settings, the calibration statistics (an interrupted run resumes
from them) and a report (``report.md``: per operand format, realised outlier fractions, weight
bytes, calibration time, peak memory). ``jdq sample q/ptq4dit`` and ``jdq eval q/ptq4dit`` then use
it without recalibrating. Recipe options: ``--option NAME=VALUE`` (JSON values: ``wbits=4``,
``search=true``, ``search=null``); each recipe's options and defaults: ``jdq quantize --recipe NAME
--list-options``.

Calibrate with the sampler you will sample with (``--sampler``, ``--steps``, ``--guidance``;
default: the ``animal-mnist`` protocol's DDIM 15 steps, guidance 1.5, for the embedded model,
else the model's sampling defaults): time-grouped recipes (``tq-dit``) follow its steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from jdq.cli._common import COMMANDS, CliError, require_writable

NAME = "quantize"
HELP = COMMANDS[NAME][1]


def add_parser(sub):
    """Add ``jdq quantize`` to an argparse sub-parser collection; return its parser."""
    p = sub.add_parser(NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="a jdq model folder (a class-conditional DiT); default: the embedded Animal-MNIST DiT")
    p.add_argument("--recipe", required=True, help="recipe name (tq-dit, ptq4dit, q-dit, w8a8, ...)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="a recipe option (repeatable)")
    p.add_argument("--list-options", action="store_true", help="print the recipe's options and defaults, then exit")
    p.add_argument("--out", default=None, metavar="DIR", help="the folder to write (created)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration conditions (default: the recipe's)")
    p.add_argument("--sampler", default=None, help="sampler to calibrate along (ddpm, ddim)")
    p.add_argument("--steps", type=int, default=None, help="its number of steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="calibration sample j uses fold_in(key(seed + 1), j)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_options(items) -> dict:
    """``["wbits=4", "search=true"]`` -> ``{"wbits": 4, "search": True}`` (values as JSON, else strings)."""
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise CliError(f"--option {item!r}: expected NAME=VALUE")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def _report(qm, model, calibration_s: float, peak_mib: float) -> tuple[dict, str]:
    """The report dict and its markdown."""
    import numpy as np

    from jdq import quant as Q
    from jdq.models.base import flatten_params

    plan, state = qm.plan, qm.quantizer.state
    flat = flatten_params(qm.params)
    rows, wbytes, fbytes = [], 0, 0
    for key in plan.quantized_keys:
        op = plan.operand(key)
        rule = plan.rules[plan.assignment[key]]
        bits, fmt = None, type(rule.transform.meta).__name__
        for meta, _, _ in Q.find_stages(rule.transform.meta, None):
            if hasattr(meta, "bits_per_element"):
                bits, fmt = meta.bits_per_element, meta.fmt
                break
            if hasattr(meta, "bits"):
                bits, fmt = float(meta.bits), f"int{meta.bits} ({meta.kind})"
                break
            if getattr(meta, "kind", None) == "static_group":
                bits, fmt = float(meta.fmt[3:]) + 16.0 / meta.group_size, f"{meta.fmt} g{meta.group_size} (static)"
                break
        ratio = None
        st = state.get(key)
        if isinstance(st, dict) and "ratio" in st:
            ratio = float(np.mean(np.asarray(st["ratio"])))
        row = {"operand": key, "rule": rule.label, "format": fmt, "bits": bits, "outlier_fraction": ratio}
        if op.role == "weight" and op.site + ".kernel" in flat:
            n = int(np.prod(np.shape(flat[op.site + ".kernel"])))
            fbytes += 2 * n
            wbytes += int(round(n * (bits if bits is not None else 16.0) / 8))
        rows.append(row)
    report = {"recipe": qm.info["recipe"], "options": qm.info["options"], "calibration": qm.info.get("calibration"),
              "calibration_s": calibration_s, "prepare_s": qm.info.get("prepare_s"), "peak_rss_mib": peak_mib,
              "quantized_weight_bytes": wbytes, "bf16_weight_bytes": fbytes, "operands": rows}
    lines = [f"# `{qm.info['recipe']}` on {model.config.source or model.family}", "",
             f"options: `{json.dumps(qm.info['options'], default=str)}`", "",
             f"calibration: {calibration_s:.1f} s, state building {qm.info.get('prepare_s', 0):.1f} s, "
             f"peak resident memory {peak_mib:.0f} MiB; quantized weights {wbytes / 2**20:.3f} MiB "
             f"(bf16: {fbytes / 2**20:.3f} MiB)", "", "| operand | rule | format | bits/elem | outlier fraction |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        bits = "—" if r["bits"] is None else f"{r['bits']:.3g}"
        frac = "—" if r["outlier_fraction"] is None else f"{r['outlier_fraction']:.3f}"
        lines.append(f"| {r['operand']} | {r['rule']} | {r['format']} | {bits} | {frac} |")
    return report, "\n".join(lines) + "\n"


def run(args) -> int:
    """``jdq quantize``: validate, calibrate, build the state, write the folder."""
    from jdq import recipes

    if args.recipe not in recipes.names():
        raise CliError(f"unknown quantization recipe {args.recipe!r}; known: {', '.join(recipes.names())}")
    recipe = recipes.get(args.recipe)
    if args.list_options:
        for k, v in recipe.options.items():
            print(f"{k} = {json.dumps(v)}")
        return 0
    if args.out is None:
        raise CliError("--out DIR is required (the folder to write)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / recipes.saved.MANIFEST).exists() \
            and not (out / recipes.saved.CALIBRATION).exists():
        raise CliError(f"--out {out} is a non-empty folder that is not a quantized model; choose another")
    require_writable(out, "--out", folder=True)  # before calibrating, not after
    if args.calib_samples is not None and args.calib_samples < 1:
        raise CliError(f"--calib-samples must be >= 1, got {args.calib_samples}")
    options = parse_options(args.option)
    try:
        recipe.resolve_options(**options)
    except recipes.RecipeError as e:
        raise CliError(str(e)) from None
    from jdq.cli.sample import _resolve_model, _validate_sampler
    from jdq.metrics import protocols

    folder, model, defaults = _resolve_model(args.model)
    from jdq.models.spec import find_spec

    spec = find_spec(model)
    if spec is None or not spec.class_conditional:
        raise CliError(f"jdq quantize calibrates class-conditional DiTs; {folder} is a {model.family} model")
    if args.model is None:  # the embedded model: the animal-mnist protocol's sampling
        proto = protocols.get("animal-mnist")
        defaults = dict(defaults, sampler=proto.sampler, steps=proto.steps, guidance=proto.guidance)
    sargs = argparse.Namespace(sampler=args.sampler, steps=args.steps, eta=0.0, shift=None)
    sampler = _validate_sampler(model, sargs, defaults)
    guidance = args.guidance if args.guidance is not None else float(defaults.get("guidance", 1.0))
    import numpy as np

    k = model.config.num_classes
    settings = recipe.calibration(**recipe.resolve_options(**options)) if recipe.calibration else None
    n = args.calib_samples or (settings.samples if settings is not None and settings.samples else 32)
    labels = (np.arange(n) % k).astype(np.int32)
    out.mkdir(parents=True, exist_ok=True)
    print(f"jdq quantize: {args.recipe} on {folder.name}, {n} calibration samples along {sampler.kind} "
          f"{sampler.num_steps} steps, guidance {guidance:g}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        qm = recipes.quantize(model, args.recipe, sampler=sampler, cond=labels, guidance=guidance, seed=args.seed,
                              calib_samples=n, stats_path=out / recipes.saved.CALIBRATION,
                              progress=not args.no_progress, **options)
    except (recipes.RecipeError, KeyError, ValueError) as e:
        raise CliError(f"recipe {args.recipe!r}: {e}") from None
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    report, md = _report(qm, model, qm.info.get("calibration_s", 0.0), peak)
    report["total_s"] = total
    from jdq.io import atomic_write_text

    atomic_write_text(out / "report.md", md)
    recipes.saved.save(out, qm, model, model_path=folder, report=report)
    print(f"wrote {out} in {total:.1f}s (calibration {report['calibration_s']:.1f}s, peak {peak:.0f} MiB)")
    return 0
