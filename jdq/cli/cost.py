"""``jdq cost``: end-to-end latency and energy of a plan on a hardware preset, and MixDiT's speedup.

For each model (the families' named configs: DiT-XL/2, PixArt-Σ, SD3-medium by default) it traces
one denoising step's matmuls abstractly, prints latency and energy of ``--plan`` on ``--hw`` for
``--steps`` steps, and the speedup of that over ``--baseline-plan`` on ``--baseline`` (default:
the ``mixdit`` recipe on the MixDiT-like accelerator over FP16 on an RTX 3090), beside MixDiT's
reported 2.10–5.32×. A plan is a quantization recipe (:mod:`jdq.recipes`, as ``jdq sample
--quant``; its operand formats read by :func:`jdq.hw.workload.from_plan`) or an unquantized
``fp16`` / ``bf16`` / ``fp32``. Only the denoiser's GEMMs and attention matmuls are counted (see
:mod:`jdq.hw.cost`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jdq.cli._common import COMMANDS

#: MixDiT's reported speedup range over an RTX 3090 (arXiv 2504.08398 abstract).
MIXDIT_REPORTED = (2.10, 5.32)

#: Unquantized plans (every operand in that float format); every other plan is a recipe.
FLOAT_PLANS = ("fp16", "bf16", "fp32")

NAME = "cost"
HELP = COMMANDS[NAME][1]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``cost`` sub-command to an ``argparse`` sub-parser collection; return its parser."""
    from jdq.hw import presets
    from jdq.models.spec import named_configs

    p = subparsers.add_parser(
        NAME, help=HELP,
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(named_configs()), metavar="MODEL",
                   help=f"models to cost (default: all of {list(named_configs())})")
    p.add_argument("--hw", default="mixdit_like", help=f"hardware preset, one of {sorted(presets.PRESETS)}")
    p.add_argument("--plan", default="mixdit", help="a recipe (as `jdq sample --quant`) or fp16 / bf16 / fp32")
    p.add_argument("--baseline", default="rtx3090", help="baseline hardware preset ('none' to skip)")
    p.add_argument("--baseline-plan", default="fp16", help="baseline plan (a recipe or fp16 / bf16 / fp32)")
    p.add_argument("--linear-outliers", type=float, default=None,
                   help="override the outlier (MX9) fraction of linear inputs of the plan's outlier splits")
    p.add_argument("--attn-outliers", type=float, default=None,
                   help="override the outlier (MX9) fraction of attention operands of the plan's outlier splits")
    p.add_argument("--batch", type=int, default=2, help="model inputs per call (2: one image with CFG)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: per model)")
    p.add_argument("--efficiency", type=float, default=None,
                   help="fraction of peak compute a GPU reaches (applies to GPU presets; default 1.0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON (atomically)")
    return p


def _hardware(name: str, efficiency: float | None):
    from jdq.hw import GPU, presets, replace

    hw = presets.get(name)
    if efficiency is not None and isinstance(hw, GPU):
        if not 0 < efficiency <= 1:
            raise ValueError(f"--efficiency must be in (0, 1], got {efficiency}")
        hw = replace(hw, efficiency=efficiency)
    return hw


def _plan_names() -> tuple[str, ...]:
    from jdq import recipes

    return FLOAT_PLANS + tuple(recipes.names())


def format_fn(name: str, operands, linear_outliers: float | None = None, attn_outliers: float | None = None):
    """The cost model's format function of plan ``name`` on a model's ``operands``: a recipe's plan, read by
    :func:`jdq.hw.workload.from_plan`, with its outlier ratios optionally overridden; or a float format."""
    from jdq import quant as Q
    from jdq import recipes
    from jdq.hw import workload

    if name in FLOAT_PLANS:
        return workload.uniform(name)
    plan = recipes.plan_for(name, operands)
    if recipes.get(name).calibrated:
        return workload.from_plan(plan)  # its static scales do not change how operands are stored
    state = plan.init()
    for roles, ratio in ((Q.ACTIVATION_ROLES, linear_outliers), (Q.ATTENTION_ROLES, attn_outliers)):
        if ratio is not None:
            keys = [k for k in plan.quantized_keys if plan.operand(k).role in roles]
            state = Q.set_outlier_ratio(plan, state, ratio, keys)
    return workload.from_plan(plan, state)


def cost_rows(args) -> tuple[list[dict], list[str]]:
    """Evaluate every requested model; return (result rows, error messages)."""
    import jax

    from jdq.hw import evaluate, workload
    from jdq.models.spec import named_config

    hw = _hardware(args.hw, args.efficiency)
    base = None if args.baseline in (None, "none") else _hardware(args.baseline, args.efficiency)
    rows, errors = [], []
    for name in args.models:
        try:
            ops = workload.model_operands(name, batch=args.batch)
        except Exception as e:  # a model family that fails to build is reported, the others still run
            errors.append(f"{name}: could not trace the model ({type(e).__name__}: {e})")
            continue
        steps = args.steps or named_config(name).steps
        wl = workload.from_operands(ops, format_fn(args.plan, ops, args.linear_outliers, args.attn_outliers))
        cost = jax.tree.map(float, evaluate(hw, wl).total())
        row = dict(model=name, hw=args.hw, plan=args.plan, batch=args.batch, steps=steps, gemms=len(wl),
                   gmacs_per_step=cost.macs / 1e9, step_ms=cost.seconds * 1e3, total_s=cost.seconds * steps,
                   energy_j=cost.energy_j * steps, compute_ms=cost.compute_s * 1e3, memory_ms=cost.memory_s * 1e3)
        if base is not None:
            bwl = workload.from_operands(ops, format_fn(args.baseline_plan, ops))
            bcost = jax.tree.map(float, evaluate(base, bwl).total())
            row.update(baseline=args.baseline, baseline_plan=args.baseline_plan,
                       baseline_step_ms=bcost.seconds * 1e3, baseline_total_s=bcost.seconds * steps,
                       baseline_energy_j=bcost.energy_j * steps, speedup=bcost.seconds / cost.seconds,
                       energy_ratio=bcost.energy_j / cost.energy_j)
        rows.append(row)
    return rows, errors


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`cost_rows` results."""
    lines = []
    if not rows:
        return "(no results)"
    r0 = rows[0]
    lines.append(f"plan {r0['plan']!r} on {r0['hw']}, batch {r0['batch']} per call; GEMMs and attention matmuls only")
    head = f"{'model':<14}{'steps':>6}{'GMAC/step':>11}{'ms/step':>10}{'total s':>10}{'energy J':>10}"
    if "speedup" in r0:
        head += f"{'base ms/step':>14}{'speedup':>9}{'energy x':>10}  MixDiT reported"
    lines.append(head)
    for r in rows:
        line = (f"{r['model']:<14}{r['steps']:>6}{r['gmacs_per_step']:>11.1f}{r['step_ms']:>10.3f}"
                f"{r['total_s']:>10.3f}{r['energy_j']:>10.3f}")
        if "speedup" in r:
            lo, hi = MIXDIT_REPORTED
            line += f"{r['baseline_step_ms']:>14.3f}{r['speedup']:>8.2f}x{r['energy_ratio']:>9.1f}x  {lo:.2f}-{hi:.2f}x"
        lines.append(line)
    if "speedup" in r0:
        lines.append(f"baseline: plan {r0['baseline_plan']!r} on {r0['baseline']}")
    return "\n".join(lines)


def write_json_atomically(path: str, payload) -> None:
    """Write ``payload`` as JSON to ``path`` via a temporary file and a rename."""
    from jdq.io import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2))


def run(args) -> int:
    """Run ``jdq cost`` with parsed ``args``; print the table; return the exit status."""
    from jdq.hw import presets
    from jdq.models.spec import named_configs

    problems = []
    unknown = [m for m in args.models if m not in named_configs()]
    if unknown:
        problems.append(f"unknown model(s) {unknown}; known: {list(named_configs())}")
    for flag, value in (("--hw", args.hw), ("--baseline", args.baseline)):
        if value != "none" and value.strip().lower().replace("-", "_") not in presets.PRESETS:
            problems.append(f"{flag} {value!r} is not a preset; known: {sorted(presets.PRESETS)}")
    for flag, value in (("--plan", args.plan), ("--baseline-plan", args.baseline_plan)):
        if value not in _plan_names():
            problems.append(f"{flag} {value!r} is not a plan; known: {list(_plan_names())}")
    if args.batch < 1 or (args.steps is not None and args.steps < 1):
        problems.append("--batch and --steps must be >= 1")
    for flag, value in (("--linear-outliers", args.linear_outliers), ("--attn-outliers", args.attn_outliers)):
        if value is not None and not 0 <= value <= 1:
            problems.append(f"{flag} must be in [0, 1], got {value}")
    if args.json is not None:  # checked now, not after the models were costed
        target = Path(args.json)
        if target.is_dir():
            problems.append(f"--json {args.json} is a folder, not a file name")
        elif not target.parent.is_dir():
            problems.append(f"--json {args.json}: folder {target.parent} does not exist")
        else:
            from jdq.io import check_writable

            try:
                check_writable(target)
            except OSError as e:
                problems.append(f"--json: {e}")
    if problems:
        for p in problems:
            print(f"jdq cost: error: {p}", file=sys.stderr)
        return 2
    try:
        rows, errors = cost_rows(args)
    except (KeyError, ValueError) as e:
        print(f"jdq cost: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if "mixdit_like" in args.hw:
        print("MixDiT-like accelerator assumptions (the paper's configuration is not public):")
        for a in presets.MIXDIT_ASSUMPTIONS:
            print(f"  - {a}")
    for e in errors:
        print(f"jdq cost: error: {e}", file=sys.stderr)
    if args.json:
        write_json_atomically(args.json, dict(rows=rows, errors=errors, mixdit_reported=MIXDIT_REPORTED))
    return 1 if errors else 0
