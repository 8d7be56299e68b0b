"""``jdq sample PIPELINE --prompt …``: a converted PixArt-Σ / SD3 pipeline folder, prompts to a PNG grid.

Called by :mod:`jdq.cli.sample` when its model folder has ``pipeline.json``
(:mod:`jdq.sampling.pipelines`); the sampler options (``--sampler``, ``--steps``, ``--guidance``,
``--seed``, ``--batch-size``, ``--out``) and ``--quant`` (applied to the transformer; the text
encoders run in floating point) mean what they mean there.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

from jdq.cli._common import CliError


def load_pipeline(folder):
    """The :class:`~jdq.sampling.pipelines.TextToImage` of ``folder``; every problem a :class:`CliError`."""
    from jdq.models.tokenizers import TokenizerError
    from jdq.sampling.pipelines import PipelineError, TextToImage

    try:
        return TextToImage.load(folder)
    except (PipelineError, TokenizerError, FileNotFoundError) as e:
        raise CliError(f"cannot load pipeline {folder}: {e}") from None


def run_pipeline(args, png, npz) -> int:
    """Sample the pipeline folder ``args.model`` for ``args.prompt``; write ``png`` and ``npz``."""
    t0 = time.time()
    if not args.prompt:
        raise CliError(f"{args.model} is a text-to-image pipeline: give --prompt TEXT (repeatable)")
    if args.embeddings or args.negative_embeddings or args.classes:
        raise CliError("a pipeline folder takes --prompt/--negative-prompt, not --embeddings or --classes")
    if args.quant is not None:
        from jdq import recipes

        if args.quant not in recipes.names():
            raise CliError(f"unknown quantization recipe {args.quant!r}; known: {', '.join(recipes.names())}")
    if args.per_class is not None and args.per_class < 1:
        raise CliError(f"--per-class must be >= 1, got {args.per_class}")
    if args.vae is not None:  # the pipeline brings its own VAE; --eta / --shift are checked with the sampler
        raise CliError("--vae does not apply to a pipeline folder (it decodes with its own VAE)")
    if args.quant_text_encoders is not None:
        from jdq import recipes

        if args.quant_text_encoders not in recipes.names():
            raise CliError(f"unknown quantization recipe {args.quant_text_encoders!r}; known: "
                           f"{', '.join(recipes.names())}")
    pipe = load_pipeline(args.model)
    if args.quant_text_encoders is not None:
        from jdq import recipes

        try:
            pipe.encoder_quant = recipes.encoder_quantizers(pipe, args.quant_text_encoders)
        except ValueError as e:
            raise CliError(str(e)) from None
    import numpy as np

    from jdq.cli._sampling import quantizer as _quantizer, validate_sampler as _validate_sampler
    from jdq.models.spec import spec_of
    from jdq.sampling.generate import generate
    from jdq.sampling.images import save_grid_and_npz, to_uint8

    sampler = _validate_sampler(pipe.transformer, args, pipe.defaults)
    guidance = args.guidance if args.guidance is not None else pipe.defaults.get(
        "guidance", spec_of(pipe.kind).defaults["guidance"])
    prompts = list(args.prompt) * (args.per_class or 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cond = pipe.encode(prompts)
        uncond = pipe.encode([args.negative_prompt or ""], "negative prompt") if guidance != 1.0 else None
    for w in caught:
        print(f"jdq sample: warning: {w.message}", file=sys.stderr)
    quantized = None
    if args.quant is not None:  # the transformer's sites (the encoders run in floating point)
        quantized = _quantizer(pipe.transformer, args, sampler, cond, uncond, guidance, pipe.defaults)
    print(f"jdq sample: {len(prompts)} images of {pipe.kind} pipeline {args.model}, {sampler.kind} "
          f"{sampler.num_steps} steps, guidance {guidance:g}, {'quant ' + args.quant if args.quant else 'floating point'}",
          file=sys.stderr)
    try:
        latents = generate(pipe.transformer, cond, uncond=uncond, sampler=sampler, guidance=guidance, seed=args.seed,
                           batch_size=args.batch_size, quant=None if quantized is None else quantized.quantizer,
                           params=None if quantized is None else quantized.params, progress=not args.no_progress)
    except ValueError as e:
        raise CliError(str(e)) from None
    images = to_uint8(pipe.decode(latents))
    settings = dict(model=str(args.model), family=pipe.kind, prompts=prompts, negative_prompt=args.negative_prompt or "",
                    sampler=sampler.kind, steps=sampler.num_steps, guidance=guidance, seed=args.seed,
                    quant=args.quant or "", quant_text_encoders=args.quant_text_encoders or "")
    save_grid_and_npz(png, npz, images, dict(samples=latents, images=images,
                                             settings=np.asarray(json.dumps(settings, allow_nan=False))))
    print(f"wrote {png} and {npz} in {time.time() - t0:.1f}s")
    return 0
