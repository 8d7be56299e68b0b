"""``jdq sweep``: a grid of quantization settings vmapped through one compiled sampler, with a quality–latency front.

Every point of the grid (the Cartesian product of the ``--vary`` values) samples the same
noise as the floating-point run; settings that are state (outlier ratios) run vmapped in one
compiled sampler, in chunks sized to memory and split over local devices; settings that change
the plan (``recipe``) compile separately, and the output says which did. Per point: the chosen
quality metrics vs FP (Animal-FID with a jackknife interval, paired ΔFID, PSNR, SSIM) and the cost
model's latency and energy per image on each ``--hardware`` preset. Writes ``sweep.json``,
``sweep.md`` and ``pareto.png`` (quality vs latency, the front highlighted) to ``--out``; a rerun
with the same settings resumes from the finished chunks.

Settings (``--vary KEY=V1,V2,…``; repeat ``--vary`` for a grid):

  recipe=A,B                  the recipe (structure: each compiles separately)
  ratio=…, linear_ratio=…,    MixDiT outlier fractions in [0, 1] (state: vmapped)
  attn_ratio=…
  bits.SITE=4,8               bit width of one linear layer of the transformer blocks (its weight
                              and its input), e.g. bits.blocks.0.attn.qkv=4,8 (state: vmapped)
  bits[GLOB]=4,8              bit width of every block linear layer matching the glob (``*``
                              matches across dots), e.g. 'bits[blocks.*.mlp.*]=4,8' (quote it)
  timegroup_bits=8-4-4-8,…    one width per time group for every block linear layer: a pattern of
                              G widths splits the steps into G near-equal consecutive groups;
                              patterns of one length are state (vmapped), of different lengths
                              structure (compiled separately); bits.* settings override it

Bit-width settings replace a recipe (do not pass --recipe): the block linear layers run in the
formats of ``--bits-family`` (int: 2..8 bits, dynamic per-row int, weights per output channel and
inputs per token; mx: 4, 6, 9 = MX4 / MX6 / MX9; mxfp: 4, 6, 8 = MXFP4 / MXFP6 / MXFP8), layers no
setting names at ``--bits-default`` (the family's widest), every other operand in float. The
output's last line (and ``structure`` in sweep.json) says which settings ran vmapped within one
compilation and which split the grid into separate compilations.
"""

from __future__ import annotations

import argparse
import sys

from jdq.cli._common import COMMANDS, CliError

NAME = "sweep"
HELP = COMMANDS[NAME][1]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``sweep`` sub-command; return its parser."""
    p = subparsers.add_parser(NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="jdq model folder (default: the embedded Animal-MNIST DiT)")
    p.add_argument("--recipe", default=None, help="quantization recipe (jdq.recipes), unless --vary recipe=...")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a setting and its values (repeat for a grid)")
    p.add_argument("--metrics", default="animal-fid,dfid,psnr,ssim",
                   help="comma-separated quality metrics; the first is the Pareto plot's y axis")
    p.add_argument("--hardware", default="mixdit_like", help="comma-separated hardware presets (jdq.hw.presets)")
    p.add_argument("--cost-model", default=None,
                   help="price each point's plan on these model shapes (e.g. dit-xl-2) instead of the swept model's")
    p.add_argument("--samples", type=int, default=50, help="samples per point (class-balanced)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-chunk", type=int, default=None, help="at most this many points per vmapped call (default: as many as memory holds; 4 on a CPU)")
    p.add_argument("--calib-samples", type=int, default=8, help="samples to calibrate calibrated recipes on")
    p.add_argument("--bits-family", default="int", choices=["int", "mx", "mxfp"],
                   help="formats of bits.* / timegroup_bits widths (default int)")
    p.add_argument("--bits-default", type=int, default=None,
                   help="width of block linear layers no bits.* setting names (default: the family's widest)")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    return p


def run(args) -> int:
    """Run ``jdq sweep``; returns the exit status."""
    from jdq import recipes
    from jdq.cli.sample import _resolve_model
    from jdq.metrics.shards import RunFolderError
    from jdq.sweep import core, runner

    if args.samples < 1 or args.steps < 1:
        raise CliError("--samples and --steps must be >= 1")
    if args.max_chunk is not None and args.max_chunk < 1:
        raise CliError("--max-chunk must be >= 1")
    if not args.vary:
        raise CliError("nothing to sweep: give at least one --vary KEY=V1,V2,...")
    try:
        vary = core.parse_vary(args.vary)
    except core.SweepError as e:
        raise CliError(str(e)) from None
    from jdq.sweep import bits as B
    has_bits = any(B.is_bits_key(k) for k in vary)
    if has_bits and (args.recipe is not None or "recipe" in vary):
        raise CliError("bits.* / timegroup_bits set the block linear layers' formats themselves: "
                       "do not combine them with --recipe or --vary recipe=...")
    if not has_bits and (args.bits_default is not None or args.bits_family != "int"):
        raise CliError("--bits-family / --bits-default apply to bits.* / timegroup_bits settings only")
    if args.recipe is None and "recipe" not in vary and not has_bits:
        raise CliError("no recipe: give --recipe NAME or --vary recipe=A,B (or vary bit widths: bits.SITE=4,8)")
    if args.recipe is not None and args.recipe not in recipes.names():
        raise CliError(f"unknown recipe {args.recipe!r}; known: {', '.join(recipes.names())}")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in runner.METRICS]
    if bad:
        raise CliError(f"unknown metric(s) {bad}; known: {', '.join(runner.METRICS)}")
    hardware = [h.strip() for h in args.hardware.split(",") if h.strip()]
    from jdq.hw import presets
    from jdq.models.spec import named_configs
    bad = [h for h in hardware if h.lower().replace("-", "_") not in presets.PRESETS]
    if bad:
        raise CliError(f"unknown hardware preset(s) {bad}; known: {', '.join(sorted(presets.PRESETS))}")
    if args.cost_model is not None and args.cost_model not in named_configs():
        raise CliError(f"unknown --cost-model {args.cost_model!r}; known: {', '.join(named_configs())}")
    folder, model, defaults = _resolve_model(args.model)
    from jdq.models.spec import spec_of
    if not spec_of(model).class_conditional:
        raise CliError(f"jdq sweep samples class-conditional models (DiT); {folder} is a {model.family} model")
    try:
        payload = runner.run_sweep(args.out, model, recipe=args.recipe, vary=vary, metrics=metrics, hardware=hardware,
                                   samples=args.samples, steps=args.steps, seed=args.seed, guidance=args.guidance,
                                   defaults=defaults, max_chunk=args.max_chunk, cost_model=args.cost_model,
                                   calib_samples=args.calib_samples, model_name=folder.name,
                                   bits_family=args.bits_family, bits_default=args.bits_default)
    except (core.SweepError, RunFolderError) as e:
        raise CliError(str(e)) from None
    print(runner.markdown_table(payload), end="")
    s = payload["structure"]
    print(f"wrote {args.out}/sweep.json, sweep.md" + (", pareto.png" if "pareto" in payload else ""), file=sys.stderr)
    return 0
