"""What the sampling sub-commands share (``jdq sample`` for a model or a pipeline folder, ``jdq quantize``)."""

from __future__ import annotations

import sys

from jdq.cli._common import CliError, require_finite


def validate_sampler(model, args, defaults):
    """The sampler of ``--sampler`` / ``--steps`` / ``--eta`` / ``--shift`` (the model's defaults filled in); bad values are CliErrors."""
    from jdq.sampling import SAMPLERS
    from jdq.sampling.generate import resolve_sampler

    name = args.sampler or defaults.get("sampler")
    aliases = ("dpm-solver++", "dpmpp2m", "flow-euler")
    if name is not None and name not in SAMPLERS + aliases:
        raise CliError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
    steps = args.steps if args.steps is not None else defaults.get("steps")
    if steps is not None and steps < 1:
        raise CliError(f"--steps must be >= 1, got {steps}")
    require_finite(args.eta, "--eta", minimum=0)
    require_finite(args.shift, "--shift", minimum=0, strictly=True)
    try:
        sampler = resolve_sampler(model, name, steps, eta=args.eta or 0.0, shift=args.shift,
                                  clip_denoised=bool(defaults.get("clip_denoised", False)))
    except ValueError as e:
        raise CliError(str(e)) from None
    # an option the sampler would ignore is an error: the user asked for something that cannot happen
    if args.eta is not None and sampler.kind != "ddim":
        raise CliError(f"--eta applies to the DDIM sampler only; this run uses {sampler.kind!r} (add --sampler ddim)")
    if args.shift is not None and sampler.kind != "euler":
        raise CliError(f"--shift applies to the flow-matching (euler) sampler only; this run uses {sampler.kind!r}")
    return sampler


def quantizer(model, args, sampler, cond, uncond, guidance, defaults):
    """The recipe's :class:`jdq.recipes.Quantized` for this model (calibrated first if the recipe needs it)."""
    import jax
    import numpy as np

    from jdq import recipes

    try:
        recipe = recipes.get(args.quant)
        if recipe.calibrated:
            n = max(1, min(args.calib_samples, int(np.shape(jax.tree.leaves(cond)[0])[0])))
            print(f"calibrating {args.quant} on {n} samples ({sampler.num_steps} steps)", file=sys.stderr)
        return recipes.quantize(model, args.quant, sampler=sampler, cond=cond, uncond=uncond, guidance=guidance,
                                seed=args.seed, calib_samples=args.calib_samples)
    except recipes.RecipeError as e:
        raise CliError(str(e)) from None
    except (KeyError, ValueError) as e:
        raise CliError(f"recipe {args.quant!r}: {e}") from None
