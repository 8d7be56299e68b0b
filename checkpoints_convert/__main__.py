"""``python -m checkpoints_convert {dit,inception,diffusers,transformers} IN OUT_DIR``: see :mod:`checkpoints_convert`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m checkpoints_convert",
                                     description="Convert an official checkpoint to a jdq model folder.")
    sub = parser.add_subparsers(dest="kind", required=True)
    p_dit = sub.add_parser("dit", help="a facebookresearch/DiT .pt file (e.g. DiT-XL-2-256x256.pt)")
    p_dit.add_argument("input", help="the .pt checkpoint")
    p_dit.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p_dit.add_argument("--num-heads", type=int, default=None,
                       help="attention heads (default by hidden size: 384→6, 768→12, 1024→16, 1152→16)")
    p_inc = sub.add_parser("inception", help="torch-fidelity's / pytorch-fid's FID Inception-v3 .pth "
                                              "(weights-inception-2015-12-05-6726825d.pth)")
    p_inc.add_argument("input", help="the .pth file")
    p_inc.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p_dif = sub.add_parser("diffusers", help="a diffusers model folder (config.json + *.safetensors): "
                                             "DiT, PixArt-Σ, SD3 transformer or AutoencoderKL")
    p_dif.add_argument("input", help="the model folder (e.g. .../transformer or .../vae)")
    p_dif.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p_tf = sub.add_parser("transformers", help="a transformers encoder folder (config.json + *.safetensors): "
                                               "T5EncoderModel, CLIPTextModel(WithProjection), CLIPVisionModel"
                                               "(WithProjection), CLIPModel")
    p_tf.add_argument("input", help="the model folder (e.g. .../text_encoder_3)")
    p_tf.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    for p in (p_dit, p_inc, p_dif, p_tf):
        p.add_argument("--dtype", default=None, help="store floating params as float32 (default), bfloat16 or float16")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (only a jdq model folder, "
                        "never one that is or holds the source)")
    args = parser.parse_args(argv)

    from checkpoints_convert import CheckpointError, convert

    try:
        out = convert(args.input, args.out_dir, kind=args.kind, num_heads=getattr(args, "num_heads", None),
                      dtype=args.dtype, overwrite=args.overwrite)
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from jdq.models import read_config

    family, cfg = read_config(out)
    print(f"wrote {out} ({family}: {cfg})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
