"""``jdq convert``: an official checkpoint (DiT .pt, diffusers folder) to a jdq model folder."""

from __future__ import annotations

from pathlib import Path

from jdq.cli._common import COMMANDS, CliError

NAME = "convert"
HELP = COMMANDS[NAME][1]


def add_parser(sub):
    """Add ``jdq convert`` to an argparse sub-parser collection; return its parser."""
    p = sub.add_parser(NAME, help=HELP,
                       description="Convert a facebookresearch/DiT .pt file, the FID Inception-v3 .pth of torch-fidelity "
                                   "or pytorch-fid, a diffusers model folder (DiT, PixArt-Σ, SD3 transformer, "
                                   "AutoencoderKL) or a transformers encoder folder (T5EncoderModel, CLIP text/vision, "
                                   "CLIPModel) to a jdq model folder.")
    p.add_argument("source", help="a DiT .pt checkpoint, an Inception .pth, or a diffusers model folder with config.json")
    p.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--kind", choices=("dit", "inception", "diffusers", "transformers"), default=None, help="source kind (default: guessed)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads of a DiT .pt (default by width)")
    p.add_argument("--dtype", default=None, help="store floating params as float32 (default), bfloat16 or float16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (only a jdq model folder, "
                        "never one that is or holds the source)")
    return p


def run(args) -> int:
    """``jdq convert``: the checkpoint conversions of :mod:`checkpoints_convert`."""
    try:
        from checkpoints_convert import CheckpointError, convert
    except ImportError as e:
        raise CliError(f"checkpoint conversion is unavailable ({e}); install jdq with the [torch] extra") from None
    if not Path(args.source).exists():
        raise CliError(f"source {args.source} does not exist")
    try:
        out = convert(args.source, args.out_dir, kind=args.kind, num_heads=args.num_heads, dtype=args.dtype,
                      overwrite=args.overwrite)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        raise CliError(str(e).strip("'\"")) from None
    print(f"wrote {out}")
    return 0
