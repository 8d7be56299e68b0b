"""``jdq eval PIPELINE --metrics clip --prompts FILE --clip CLIP_DIR``: CLIP score of a text-to-image pipeline.

Samples one image per prompt (a converted PixArt-Σ / SD3 pipeline folder; sample ``j`` uses key
``fold_in(key(seed), j)``, negative prompt ``""``), scores each against its prompt with a
converted ``CLIPModel`` folder (:mod:`jdq.metrics.clip_score`, torchmetrics' definition) and
writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/samples.png``. The score's 95 %
interval is the grouped jackknife of the mean over prompts (``--groups``). Unlike the DiT
protocols this run is not sharded: rerunning samples again.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jdq.cli._common import CliError


def run_clip(args) -> int:
    """Validate, sample the prompts, score them, write the results."""
    t0 = time.perf_counter()
    others = [m for m in args.metrics if m != "clip"]
    if others:
        raise CliError(f"--metrics clip runs on its own (text-to-image); drop {others}")
    if args.model is None or not (Path(args.model) / "pipeline.json").is_file():
        raise CliError("--metrics clip needs a text-to-image pipeline folder (a converted PixArt-Σ / SD3 pipeline)")
    if args.prompts is None:
        raise CliError("--metrics clip needs --prompts FILE (one prompt per line)")
    if args.clip is None:
        raise CliError("--metrics clip needs --clip DIR (a converted transformers CLIPModel folder with its tokenizer)")
    if args.quant:
        raise CliError("--quant with --metrics clip is not supported yet")
    from jdq.cli.encode_prompts import read_prompts
    from jdq.cli.sample_text import load_pipeline

    prompts = read_prompts(args.prompts)
    if args.samples is not None:
        prompts = prompts[: args.samples]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from jdq.metrics.clip_score import CLIPScorer, pair_scores
    from jdq.models.tokenizers import TokenizerError

    try:
        scorer = CLIPScorer.load(args.clip)
    except (FileNotFoundError, ValueError, KeyError, TokenizerError) as e:
        raise CliError(f"cannot load --clip {args.clip}: {e}") from None
    pipe = load_pipeline(args.model)
    import numpy as np

    from jdq.io import atomic_write_text
    from jdq.metrics.intervals import mean_interval
    from jdq.sampling.images import save_grid, to_uint8

    seed = 0 if args.seed is None else args.seed
    print(f"jdq eval: CLIP score of {len(prompts)} prompts, {pipe.kind} pipeline {args.model}", file=sys.stderr)
    _, images = pipe.generate(prompts, "", guidance=args.guidance, sampler=args.sampler, steps=args.steps, seed=seed,
                              batch_size=args.batch_size, progress=not args.no_progress)
    images = to_uint8(images)
    t1 = time.perf_counter()
    scores = pair_scores(*scorer.embeddings(images, prompts))
    iv = mean_interval(scores, groups=min(args.groups, len(scores)))
    value = max(iv.value, 0.0)
    results = {"metrics": {"clip": {**iv.to_dict(), "value": value}}, "prompts": prompts, "per_prompt": scores.tolist(),
               "settings": {"model": str(args.model), "clip": str(args.clip), "seed": seed, "guidance": args.guidance,
                            "steps": args.steps, "sampler": args.sampler},
               "timing": {"sampling_s": t1 - t0, "metrics_s": time.perf_counter() - t1}}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    md = (f"# CLIP score\n\n{len(prompts)} prompts, pipeline `{args.model}`, CLIP `{args.clip}`, seed {seed}\n\n"
          f"CLIP score {value:.2f} (95 % interval {iv.low:.2f} – {iv.high:.2f}, {iv.method})\n")
    atomic_write_text(out / "results.md", md)
    save_grid(out / "samples.png", images[: args.grid])
    print(f"CLIP score {value:.2f} [{iv.low:.2f}, {iv.high:.2f}]\nwrote {out / 'results.json'}, {out / 'results.md'}")
    return 0
