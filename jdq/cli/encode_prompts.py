"""``jdq encode-prompts PIPELINE --prompts FILE --out CACHE.safetensors``: cached text conditions.

Runs a converted PixArt-Σ / SD3 pipeline's tokenizers and text encoders on the prompts of FILE
(one per line, blank lines skipped) and writes the transformer's conditions as safetensors:
``text_emb`` [N, L, D] and ``mask`` [N, L] (PixArt-Σ) or ``pooled`` [N, P] (SD3), the form
``jdq sample PIPELINE/transformer --embeddings CACHE.safetensors`` and calibration read. With
``--negative-prompt`` the same file gets ``negative_*`` arrays for the unconditional branch.
The file is written atomically.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from jdq.cli._common import COMMANDS, CliError, require_writable

NAME = "encode-prompts"
HELP = COMMANDS[NAME][1]


def add_parser(sub):
    """Add ``jdq encode-prompts`` to an argparse sub-parser collection; return its parser."""
    p = sub.add_parser(NAME, help=HELP, description=__doc__)
    p.add_argument("pipeline", help="a converted PixArt-Σ / SD3 pipeline folder (with pipeline.json)")
    p.add_argument("--prompts", required=True, metavar="FILE", help="a text file, one prompt per line")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT", help="also cache this negative prompt")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors")
    return p


def read_prompts(path) -> list[str]:
    """The non-blank lines of ``path`` (a :class:`CliError` if there is none or the file is missing)."""
    f = Path(path)
    if not f.is_file():
        raise CliError(f"prompts file {path} does not exist")
    prompts = [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise CliError(f"prompts file {path} has no prompts")
    return prompts


def run(args) -> int:
    """Encode the prompts and write the cache."""
    from jdq.cli.sample_text import load_pipeline
    from jdq.io import atomic_write

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CliError(f"--out {out}: expected a .safetensors file")
    require_writable(out, "--out")  # before the encoders run
    if not (Path(args.pipeline) / "pipeline.json").is_file():
        raise CliError(f"{args.pipeline} is not a pipeline folder (no pipeline.json; convert a diffusers "
                       f"PixArtSigmaPipeline / StableDiffusion3Pipeline folder with `jdq convert`)")
    prompts = read_prompts(args.prompts)
    pipe = load_pipeline(args.pipeline)
    import numpy as np
    from safetensors.numpy import save_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arrays = pipe.encode(prompts)
        if args.negative_prompt is not None:
            arrays.update({f"negative_{k}": v for k, v in pipe.encode([args.negative_prompt], "negative prompt").items()})
    for w in caught:
        print(f"jdq encode-prompts: warning: {w.message}", file=sys.stderr)
    arrays = {k: np.ascontiguousarray(v.astype(np.uint8) if v.dtype == bool else v) for k, v in arrays.items()}
    atomic_write(out, lambda tmp: save_file(arrays, tmp, metadata={"kind": pipe.kind, "count": str(len(prompts))}))
    print(f"wrote {out} ({len(prompts)} prompts, text_emb {arrays['text_emb'].shape})")
    return 0
