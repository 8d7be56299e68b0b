"""``jdq sample PIPELINE --prompt …``: a converted PixArt-Σ / SD3 pipeline folder, prompts to a PNG grid.

Called by :mod:`jdq.cli.sample` when its model folder has ``pipeline.json``
(:mod:`jdq.sampling.pipelines`); the sampler options (``--sampler``, ``--steps``, ``--guidance``,
``--seed``, ``--batch-size``, ``--out``) mean what they mean there.
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
        raise CliError("--quant on a pipeline folder is not supported yet; quantize its transformer folder "
                       "with `jdq sample FOLDER/transformer --embeddings` (see `jdq encode-prompts`)")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    if args.per_class is not None and args.per_class < 1:
        raise CliError(f"--per-class must be >= 1, got {args.per_class}")
    for flag, value in (("--eta", args.eta), ("--shift", args.shift), ("--vae", args.vae)):
        if value is not None:  # the pipeline brings its own scheduler settings and VAE
            raise CliError(f"{flag} does not apply to a pipeline folder (it uses its own scheduler and VAE)")
    pipe = load_pipeline(args.model)
    import numpy as np

    from jdq.sampling.images import save_grid_and_npz, to_uint8

    prompts = list(args.prompt) * (args.per_class or 1)
    print(f"jdq sample: {len(prompts)} images of {pipe.kind} pipeline {args.model}", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            latents, images = pipe.generate(prompts, args.negative_prompt, guidance=args.guidance,
                                            sampler=args.sampler, steps=args.steps, seed=args.seed,
                                            batch_size=args.batch_size, progress=not args.no_progress)
        except ValueError as e:
            raise CliError(str(e)) from None
    for w in caught:
        print(f"jdq sample: warning: {w.message}", file=sys.stderr)
    images = to_uint8(images)
    settings = dict(model=str(args.model), family=pipe.kind, prompts=prompts, negative_prompt=args.negative_prompt or "",
                    guidance=args.guidance, steps=args.steps, seed=args.seed)
    save_grid_and_npz(png, npz, images, dict(samples=latents, images=images,
                                             settings=np.asarray(json.dumps(settings, allow_nan=False))))
    print(f"wrote {png} and {npz} in {time.time() - t0:.1f}s")
    return 0
