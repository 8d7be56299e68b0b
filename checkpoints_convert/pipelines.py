"""A diffusers ``PixArtSigmaPipeline`` / ``StableDiffusion3Pipeline`` folder -> a jdq pipeline folder.

Each component is converted with its converter (the transformer and the VAE as diffusers
folders, the text encoders as transformers folders, streamed), the tokenizer folders are copied
unchanged, and ``pipeline.json`` / ``sampling.json`` record the pipeline kind, the prompt
length and the scheduler's defaults (see :mod:`jdq.sampling.pipelines`). The output is written
atomically: a failed component leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from checkpoints_convert.common import CheckpointError

#: diffusers pipeline ``_class_name`` -> (jdq pipeline kind, text encoder names, max prompt tokens).
PIPELINES = {
    "PixArtSigmaPipeline": ("pixart", ("text_encoder",), 300),
    "StableDiffusion3Pipeline": ("sd3", ("text_encoder", "text_encoder_2", "text_encoder_3"), 256),
}


def is_pipeline_folder(folder) -> bool:
    """Whether ``folder`` is a diffusers pipeline folder (has ``model_index.json``)."""
    return (Path(folder) / "model_index.json").is_file()


def is_jdq_pipeline_folder(folder) -> bool:
    """Whether ``folder`` is a converted jdq pipeline folder (its ``pipeline.json`` names a pipeline kind)."""
    from jdq.sampling.pipelines import KINDS, PIPELINE_FILE

    p = Path(folder) / PIPELINE_FILE
    try:
        meta = json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("kind") in KINDS


def _sampling_defaults(kind: str, src: Path) -> dict:
    sched = src / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text()) if sched.is_file() else {}
    if kind == "pixart":
        return {"sampler": "dpm++2m", "steps": 20, "guidance": 4.5}
    return {"sampler": "euler", "steps": 28, "guidance": 7.0, "shift": float(cfg.get("shift", 3.0))}


def convert_pipeline_folder(in_dir, out_dir, dtype=None, overwrite: bool = False) -> Path:
    """Convert a diffusers text-to-image pipeline folder; returns the jdq pipeline folder."""
    from checkpoints_convert import convert_diffusers_folder
    from checkpoints_convert.transformers_text import convert_transformers_folder
    from jdq.models.base import write_folder_atomically
    from jdq.sampling.pipelines import PIPELINE_FILE

    src = Path(in_dir)
    try:
        index = json.loads((src / "model_index.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{src}: cannot read model_index.json ({e})") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{src / 'model_index.json'}: expected a JSON object, found a JSON {type(index).__name__}")
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise CheckpointError(f"{src}: pipeline {name!r} is not supported; supported: {sorted(PIPELINES)}")
    kind, encoders, max_len = PIPELINES[name]
    for part in ("transformer", "vae") + encoders + tuple(e.replace("text_encoder", "tokenizer") for e in encoders):
        if not (src / part).is_dir():
            raise CheckpointError(f"{src}: the {name} lacks its {part} folder")

    def write(tmp: Path):
        convert_diffusers_folder(src / "transformer", tmp / "transformer", dtype=dtype)
        convert_diffusers_folder(src / "vae", tmp / "vae", dtype=dtype)
        for enc in encoders:
            convert_transformers_folder(src / enc, tmp / enc, dtype=dtype)
            tok = enc.replace("text_encoder", "tokenizer")
            shutil.copytree(src / tok, tmp / tok)
        (tmp / PIPELINE_FILE).write_text(json.dumps({"kind": kind, "max_sequence_length": max_len,
                                                     "source": name}, indent=2) + "\n")
        (tmp / "sampling.json").write_text(json.dumps(_sampling_defaults(kind, src), indent=2) + "\n")

    return write_folder_atomically(out_dir, write, overwrite=overwrite, protect=(src,),
                                   replaceable=is_jdq_pipeline_folder)
