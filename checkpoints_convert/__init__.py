"""Official checkpoints -> jdq model folders (``config.json`` + ``params.safetensors``).

Command line::

    python -m checkpoints_convert dit IN.pt OUT_DIR [--num-heads N] [--dtype bfloat16] [--overwrite]
    python -m checkpoints_convert diffusers IN_DIR OUT_DIR [--dtype bfloat16] [--overwrite]
    python -m checkpoints_convert inception weights-inception-2015-12-05-6726825d.pth OUT_DIR
    python -m checkpoints_convert transformers T5_OR_CLIP_DIR OUT_DIR [--dtype bfloat16]

Python: :func:`convert` (auto-detects the source kind; what ``jdq convert`` calls),
:func:`convert_dit_checkpoint`, :func:`convert_diffusers_folder`, and the in-memory converters
``checkpoints_convert.dit.convert_dit_state_dict`` / ``convert_diffusers_dit``,
``checkpoints_convert.vae.convert_vae``, ``checkpoints_convert.pixart.convert_pixart``,
``checkpoints_convert.sd3.convert_sd3`` (each ``(state_dict, config) -> (params, Config)``),
``checkpoints_convert.inception.convert_inception`` (the FID Inception-v3 of torch-fidelity and
pytorch-fid; a ``.pth`` file is recognised as one by its key names).

Every source key is consumed and every shape checked (errors name the key and both shapes);
unreadable files fail with a clear message; the output folder is written atomically (a failed
conversion leaves nothing behind).

Before anything is read: ``dtype`` must name a floating dtype (float32, bfloat16, float16), and an
existing output folder is replaced (``overwrite=True``) only if it is a jdq model folder that
neither is nor contains the source. A killed conversion's hidden ``.OUT.tmp-*`` folder is removed
by the next conversion to the same ``OUT``. Converted weights must be finite (a NaN or Inf names
the param).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from checkpoints_convert.common import CheckpointError, read_diffusers_folder, read_torch_checkpoint

#: diffusers ``_class_name`` -> (jdq family, converter module, converter function).
DIFFUSERS_CLASSES = {
    "DiTTransformer2DModel": ("dit", "checkpoints_convert.dit", "convert_diffusers_dit"),
    "AutoencoderKL": ("vae", "checkpoints_convert.vae", "convert_vae"),
    "PixArtTransformer2DModel": ("pixart", "checkpoints_convert.pixart", "convert_pixart"),
    "SD3Transformer2DModel": ("sd3", "checkpoints_convert.sd3", "convert_sd3"),
}


#: Storage dtypes ``--dtype`` accepts (what jdq computes in; integer or complex storage would be a different model).
STORAGE_DTYPES = ("float32", "bfloat16", "float16")


def storage_dtype(dtype):
    """``dtype`` (a name or dtype) checked to be a floating storage dtype, or None; CheckpointError otherwise."""
    if dtype is None:
        return None
    import jax.numpy as jnp

    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise CheckpointError(f"dtype {dtype!r} is not a dtype; use one of {', '.join(STORAGE_DTYPES)}") from None
    if dt.name not in STORAGE_DTYPES:
        raise CheckpointError(f"dtype {dt.name!r} is not a floating storage dtype; use one of {', '.join(STORAGE_DTYPES)}")
    return dt


def _save(params, family: str, cfg, out_dir, dtype=None, overwrite: bool = False, source=None) -> Path:
    import jax
    import numpy as np

    from jdq.models.base import check_param_values, flatten_params, save_params

    dt = storage_dtype(dtype)
    if dt is not None:
        params = jax.tree.map(lambda a: np.asarray(a).astype(dt) if np.asarray(a).dtype.kind == "f" else a, params)
    try:
        check_param_values({k: np.asarray(v) for k, v in flatten_params(params).items()}, f"converted {source or family}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return save_params(out_dir, params, family, cfg, overwrite=overwrite, protect=() if source is None else (source,))


def _check_output(source, out_dir, overwrite: bool):
    """Fail before reading anything if ``out_dir`` exists and may not be replaced (see ``check_replaceable``)."""
    from checkpoints_convert.pipelines import is_jdq_pipeline_folder
    from jdq.models.base import check_replaceable, is_model_folder

    check_replaceable(out_dir, overwrite, protect=(source,),
                      replaceable=lambda p: is_model_folder(p) or is_jdq_pipeline_folder(p))


def convert_dit_checkpoint(in_path, out_dir, num_heads: int | None = None, dtype=None, overwrite: bool = False,
                           state=None) -> Path:
    """A facebookresearch/DiT ``.pt`` file (or its already read ``state``) -> jdq model folder ``out_dir``."""
    from checkpoints_convert.dit import convert_dit_state_dict

    storage_dtype(dtype)
    _check_output(in_path, out_dir, overwrite)
    params, cfg = convert_dit_state_dict(read_torch_checkpoint(in_path) if state is None else state,
                                         num_heads=num_heads)
    return _save(params, "dit", cfg, out_dir, dtype, overwrite, source=in_path)


def convert_inception_checkpoint(in_path, out_dir, dtype=None, overwrite: bool = False, state=None) -> Path:
    """torch-fidelity's / pytorch-fid's FID Inception-v3 ``.pth`` -> jdq model folder ``out_dir``."""
    from checkpoints_convert.inception import convert_inception

    storage_dtype(dtype)
    _check_output(in_path, out_dir, overwrite)
    params, cfg = convert_inception(read_torch_checkpoint(in_path) if state is None else state)
    return _save(params, "inception", cfg, out_dir, dtype, overwrite, source=in_path)


def convert_diffusers_state(config: dict, state_dict: dict, where: str = "diffusers config"):
    """Dispatch a diffusers ``(config, state_dict)`` on ``_class_name``; returns ``(family, params, Config)``.

    ``where`` names the config in errors about its fields (e.g. the ``config.json`` path).
    """
    name = config.get("_class_name")
    if name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single":
        name = "PixArtTransformer2DModel"  # how diffusers' own PixArt conversion script labels its output
    if name not in DIFFUSERS_CLASSES:
        raise CheckpointError(f"diffusers config has _class_name={name!r}; supported: {sorted(DIFFUSERS_CLASSES)}")
    family, module, fn = DIFFUSERS_CLASSES[name]
    for key, value in config.items():  # diffusers' string fields are names ("gelu", "ada_norm_zero"), never numbers
        if not key.startswith("_") and isinstance(value, str) and _is_number(value):
            raise CheckpointError(f"{where}: {key} is the string {value!r}; a number is expected")
    try:
        params, cfg = getattr(importlib.import_module(module), fn)(state_dict, config)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:  # a config field of the wrong type or value (e.g. "num_attention_heads": "2")
        raise CheckpointError(f"{where} ({name}) does not describe a model jdq can build: {e}") from None
    return family, params, cfg


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def convert_diffusers_folder(in_dir, out_dir, dtype=None, overwrite: bool = False) -> Path:
    """A diffusers model folder (config.json + safetensors) -> jdq model folder; returns its path."""
    storage_dtype(dtype)
    _check_output(in_dir, out_dir, overwrite)
    config, state = read_diffusers_folder(in_dir)
    family, params, cfg = convert_diffusers_state(config, state, where=str(Path(in_dir) / "config.json"))
    return _save(params, family, cfg, out_dir, dtype, overwrite, source=in_dir)


def convert(source, out_dir, *, kind: str | None = None, num_heads: int | None = None, dtype=None,
            overwrite: bool = False) -> Path:
    """Convert ``source`` to a jdq model folder; ``kind`` ``"dit"``/``"inception"``/``"diffusers"``/``"transformers"``
    or ``None`` (guess).

    A file is read as a FID Inception-v3 ``.pth`` when its keys are Inception's, else as a
    facebookresearch/DiT checkpoint; a folder with ``config.json`` as a diffusers model folder, or, when
    the config is transformers' (``model_type``, no ``_class_name``), a T5 / CLIP encoder folder
    (:mod:`checkpoints_convert.transformers_text`, streamed tensor by tensor); a folder with
    ``model_index.json`` as a PixArt-Σ / SD3 pipeline (:mod:`checkpoints_convert.pipelines`).
    Returns the output folder, loadable with ``jdq.models.load``.
    """
    src = Path(source)
    storage_dtype(dtype)  # before reading anything: a bad dtype or output fails in milliseconds
    _check_output(src, out_dir, overwrite)
    if kind is None and src.is_file():  # a .pt/.pth file: DiT or the FID Inception, told apart by its keys
        from checkpoints_convert.inception import is_inception_state_dict

        state = read_torch_checkpoint(src)
        if is_inception_state_dict(state):
            if num_heads is not None:
                raise CheckpointError("num_heads applies to DiT checkpoints; this file is a FID Inception-v3")
            return convert_inception_checkpoint(src, out_dir, dtype=dtype, overwrite=overwrite, state=state)
        return convert_dit_checkpoint(src, out_dir, num_heads=num_heads, dtype=dtype, overwrite=overwrite, state=state)
    if kind == "inception":
        return convert_inception_checkpoint(src, out_dir, dtype=dtype, overwrite=overwrite)
    if kind is None and (src / "model_index.json").is_file():  # a diffusers pipeline: every component
        from checkpoints_convert.pipelines import convert_pipeline_folder

        if num_heads is not None:
            raise CheckpointError("num_heads applies to facebookresearch/DiT .pt files only")
        return convert_pipeline_folder(src, out_dir, dtype=dtype, overwrite=overwrite)
    if kind is None:
        if (src / "config.json").is_file():
            from checkpoints_convert.transformers_text import is_transformers_config, read_transformers_config

            kind = "transformers" if is_transformers_config(read_transformers_config(src)) else "diffusers"
        else:
            raise CheckpointError(f"{src}: neither a checkpoint file nor a diffusers folder with config.json")
    if kind == "dit":
        return convert_dit_checkpoint(src, out_dir, num_heads=num_heads, dtype=dtype, overwrite=overwrite)
    if kind == "diffusers":
        if num_heads is not None:
            raise CheckpointError("num_heads applies to facebookresearch/DiT .pt files only (diffusers configs name it)")
        return convert_diffusers_folder(src, out_dir, dtype=dtype, overwrite=overwrite)
    if kind == "transformers":
        if num_heads is not None:
            raise CheckpointError("num_heads applies to facebookresearch/DiT .pt files only (transformers configs name it)")
        from checkpoints_convert.transformers_text import convert_transformers_folder

        return convert_transformers_folder(src, out_dir, dtype=dtype, overwrite=overwrite)
    raise CheckpointError(f"unknown source kind {kind!r}; use 'dit', 'inception', 'diffusers' or 'transformers'")


__all__ = ["CheckpointError", "DIFFUSERS_CLASSES", "STORAGE_DTYPES", "convert", "convert_diffusers_folder",
           "convert_diffusers_state", "convert_dit_checkpoint", "convert_inception_checkpoint", "read_diffusers_folder",
           "read_torch_checkpoint", "storage_dtype"]
