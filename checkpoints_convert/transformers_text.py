"""transformers text/image encoder folders -> jdq ``t5`` / ``clip`` model folders, streamed.

Sources: a folder with transformers' ``config.json`` and ``model.safetensors`` (or shards with a
``model.safetensors.index.json``) of ``T5EncoderModel``, ``CLIPTextModel``,
``CLIPTextModelWithProjection``, ``CLIPVisionModel(WithProjection)`` or a full ``CLIPModel``. A
full T5 (``T5ForConditionalGeneration`` / ``T5Model``) converts its encoder, with a warning that
the decoder is dropped; a decoder-only model (``is_decoder``, a causal LM) is an error.

The conversion streams: the output header is computed from the abstract model, then each output
tensor is read from its shard, transposed if it is a linear weight, cast if asked, written and
dropped, so the process holds one tensor at a time (T5-XXL: the largest is the 32128 x 4096
embedding). Floating tensors keep the source's dtype unless ``dtype`` is given. Every source key
is used or explicitly skipped (the tied ``shared``/``encoder.embed_tokens`` copy, a full T5's
decoder), every shape is checked, and errors name the key.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from checkpoints_convert.common import CheckpointError

#: transformers ``architectures`` / ``model_type`` this module converts -> jdq family.
T5_ARCHITECTURES = ("T5EncoderModel", "T5ForConditionalGeneration", "T5Model")
CLIP_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModel",
                      "CLIPVisionModelWithProjection", "CLIPModel")
TEXT_MODEL_TYPES = ("t5", "clip", "clip_text_model", "clip_vision_model")


class WeightsFolder:
    """The tensors of a transformers folder's safetensors files (sharded or not), read one at a time."""

    def __init__(self, folder: str | os.PathLike):
        from jdq.models.streaming import SafetensorsReader

        d = Path(folder)
        indices = sorted(d.glob("*.safetensors.index.json"))
        if len(indices) > 1:
            raise CheckpointError(f"{d}: several shard indices {[i.name for i in indices]}; keep one")
        if indices:
            try:
                weight_map = json.loads(indices[0].read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{indices[0]}: not a safetensors index (no weight_map: {e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in d.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"{d}: no *.safetensors weights (PyTorch .bin files are not read: re-save "
                                  f"with save_pretrained(safe_serialization=True))")
        self.where: dict[str, Any] = {}
        for name in files:
            path = d / name
            if not path.is_file():
                raise CheckpointError(f"{d}: shard {name!r} named by the index is missing")
            try:
                reader = SafetensorsReader(path)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
            for k in reader.keys():
                if k in self.where:
                    raise CheckpointError(f"{d}: key {k!r} is in both {self.where[k].path.name} and {name}")
                if weight_map is not None and weight_map.get(k) != name:
                    raise CheckpointError(f"{path}: key {k!r} is not assigned to this shard by {indices[0].name}")
                self.where[k] = reader

    def keys(self) -> list[str]:
        """All tensor names."""
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def shape(self, key: str) -> tuple[int, ...]:
        """Stored shape of ``key``."""
        return self.where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        """Stored dtype of ``key``."""
        return self.where[key].dtype(key)

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self.where[key][key]
        except (OSError, ValueError) as e:
            raise CheckpointError(str(e)) from None


class ArraySource:
    """A ``{name: array}`` mapping (e.g. a torch state dict as numpy) with :class:`WeightsFolder`'s interface."""

    def __init__(self, arrays: Mapping[str, Any]):
        self.arrays = {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v) for k, v in arrays.items()}

    def keys(self):
        """All tensor names."""
        return list(self.arrays)

    def __contains__(self, key):
        return key in self.arrays

    def shape(self, key):
        """Shape of ``key``."""
        return tuple(self.arrays[key].shape)

    def dtype(self, key):
        """Dtype of ``key``."""
        return self.arrays[key].dtype

    def __getitem__(self, key):
        return self.arrays[key]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def describe(config: Mapping[str, Any]) -> str:
    """The model's architecture name (``architectures[0]``, else from ``model_type``)."""
    archs = config.get("architectures") or []
    if archs:
        return archs[0]
    return {"t5": "T5EncoderModel", "clip": "CLIPModel", "clip_text_model": "CLIPTextModel",
            "clip_vision_model": "CLIPVisionModel"}.get(config.get("model_type"), str(config.get("model_type")))


def is_transformers_config(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` dict is a transformers model's (not a diffusers one's)."""
    return "_class_name" not in config and ("model_type" in config or "architectures" in config)


def _check_not_decoder(config: Mapping[str, Any], arch: str):
    if config.get("is_decoder") or arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        raise CheckpointError(f"{arch} is a decoder (is_decoder / a causal LM): it has no text encoder to convert; "
                              f"give a T5EncoderModel or CLIP folder (PixArt-Σ's and SD3's text_encoder*)")


def t5_config(config: Mapping[str, Any]):
    """The jdq :class:`jdq.models.t5.Config` of a transformers T5 ``config.json`` dict."""
    from jdq.models import t5

    try:
        return t5.Config.from_transformers(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"T5 config: {e}") from None


def _text_tower(d: Mapping[str, Any]):
    from jdq.models.clip import TextConfig

    return TextConfig(**{f: d[f] for f in TextConfig.__dataclass_fields__ if f in d})


def _vision_tower(d: Mapping[str, Any]):
    from jdq.models.clip import VisionConfig

    return VisionConfig(**{f: d[f] for f in VisionConfig.__dataclass_fields__ if f in d})


def clip_config(config: Mapping[str, Any], arch: str):
    """The jdq :class:`jdq.models.clip.Config` of a transformers CLIP ``config.json`` dict of ``arch``."""
    from jdq.models import clip

    try:
        if arch == "CLIPModel":
            return clip.Config(text=_text_tower(config.get("text_config") or {}),
                               vision=_vision_tower(config.get("vision_config") or {}),
                               projection_dim=config.get("projection_dim", 512), text_projection=True,
                               visual_projection=True, logit_scale=True)
        if arch.startswith("CLIPText"):
            proj = arch.endswith("WithProjection")
            return clip.Config(text=_text_tower(config), projection_dim=config.get("projection_dim") if proj else None,
                               text_projection=proj)
        proj = arch.endswith("WithProjection")
        return clip.Config(vision=_vision_tower(config), projection_dim=config.get("projection_dim") if proj else None,
                           visual_projection=proj)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"CLIP config ({arch}): {e}") from None


# --------------------------------------------------------------------------------------------
# Key plans: jdq params path -> (source key, how)
# --------------------------------------------------------------------------------------------


def _plan_by_paths(abstract_flat: Mapping[str, Any], source_key, conv_sites=()) -> dict[str, tuple[str, str]]:
    """jdq path -> (source key, op): ``kernel`` <- ``weight`` (op ``linear``, or ``patch`` for a conv site),
    ``scale`` <- ``weight``, anything else <- the same name; ``source_key`` maps a jdq name to the source's."""
    plan = {}
    for path in abstract_flat:
        if path.endswith(".kernel"):
            site = path[: -len(".kernel")]
            plan[path] = (source_key(site + ".weight"), "patch" if site in conv_sites else "linear")
        elif path.endswith(".scale"):
            plan[path] = (source_key(path[: -len(".scale")] + ".weight"), "copy")
        else:
            plan[path] = (source_key(path), "copy")
    return plan


def _expected_source_shape(op: str, shape: tuple[int, ...], patch: tuple[int, int] | None):
    if op == "linear":
        return (shape[1], shape[0])
    if op == "patch":
        c, p = patch
        return (shape[1], c, p, p)
    return tuple(shape)


def _apply(op: str, a: np.ndarray, patch: tuple[int, int] | None) -> np.ndarray:
    if op == "linear":
        return a.T
    if op == "patch":
        c, p = patch
        return a.transpose(2, 3, 1, 0).reshape(p * p * c, a.shape[0])
    return a


def plan_t5(source, config: Mapping[str, Any], arch: str):
    """``(jdq Config, plan, skipped keys)`` for a T5 source: the encoder's keys; a full T5's decoder skipped."""
    from jdq.models import t5
    from jdq.models.base import flatten_params

    cfg = t5_config(config)
    flat = flatten_params(t5.from_config(cfg, abstract=True).params)
    plan = _plan_by_paths(flat, lambda k: k)
    embed = "encoder.embed_tokens.weight" if "encoder.embed_tokens.weight" in source else "shared.weight"
    plan["shared.weight"] = (embed, "copy")
    skipped = [k for k in source.keys() if k in ("shared.weight", "encoder.embed_tokens.weight") and k != embed]
    decoder = [k for k in source.keys() if k.startswith("decoder.") or k == "lm_head.weight"]
    if decoder:
        warnings.warn(f"{arch} is a full encoder-decoder T5: converting its encoder only "
                      f"({len(decoder)} decoder/lm_head tensors are not used)", stacklevel=3)
    return cfg, flat, plan, skipped + decoder


def plan_clip(source, config: Mapping[str, Any], arch: str):
    """``(jdq Config, plan, skipped keys)`` for a CLIP source; text keys with or without ``text_model.``."""
    from jdq.models import clip
    from jdq.models.base import flatten_params

    cfg = clip_config(config, arch)
    flat = flatten_params(clip.from_config(cfg, abstract=True).params)
    bare_text = cfg.text is not None and not any(k.startswith("text_model.") for k in source.keys())
    bare_vision = cfg.vision is not None and not any(k.startswith("vision_model.") for k in source.keys())

    def source_key(k: str) -> str:  # transformers 5 saves a bare CLIPTextModel / CLIPVisionModel without the prefix
        if bare_text and k.startswith("text_model."):
            return k[len("text_model."):]
        if bare_vision and k.startswith("vision_model."):
            return k[len("vision_model."):]
        return k

    plan = _plan_by_paths(flat, source_key, conv_sites={"vision_model.embeddings.patch_embedding"})
    skipped = [k for k in source.keys() if k.endswith("position_ids")]  # old checkpoints' buffers
    return cfg, flat, plan, skipped


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def family_of_config(config: Mapping[str, Any]) -> str:
    """``"t5"`` or ``"clip"`` for a supported transformers config; a decoder or another model is an error."""
    arch = describe(config)
    _check_not_decoder(config, arch)
    if arch in T5_ARCHITECTURES or (config.get("model_type") == "t5" and arch not in CLIP_ARCHITECTURES):
        return "t5"
    if arch in CLIP_ARCHITECTURES:
        return "clip"
    raise CheckpointError(f"transformers architecture {arch!r} (model_type {config.get('model_type')!r}) is not a "
                          f"supported encoder; supported: {', '.join(T5_ARCHITECTURES + CLIP_ARCHITECTURES)}")


def plan_source(source, config: Mapping[str, Any]):
    """``(family, Config, abstract flat params, plan, skipped)`` for a transformers source and its config."""
    family = family_of_config(config)
    plan = plan_t5 if family == "t5" else plan_clip
    return (family,) + plan(source, config, describe(config))


def check_plan(source, flat, plan, skipped, cfg, what: str):
    """Every planned source key exists with the right shape; every source key is planned or skipped."""
    patch = (cfg.vision.num_channels, cfg.vision.patch_size) if getattr(cfg, "vision", None) else None
    for path, (key, op) in plan.items():
        if key not in source:
            raise CheckpointError(f"{what}: missing key {key!r} (for {path})")
        want = _expected_source_shape(op, tuple(flat[path].shape), patch)
        if tuple(source.shape(key)) != want:
            raise CheckpointError(f"{what}: key {key!r} has shape {tuple(source.shape(key))}, expected {want}")
    used = {k for k, _ in plan.values()} | set(skipped)
    left = sorted(set(source.keys()) - used)
    if left:
        raise CheckpointError(f"{what}: {len(left)} unexpected key(s) not used by the model: {left[:10]}")
    return patch


def converted_tensors(source, flat, plan, patch, dtype=None):
    """``(specs, produce)`` for :func:`jdq.models.streaming.write_safetensors`: the output names,
    dtypes (the source's, or ``dtype`` for floating tensors) and shapes, and the per-tensor converter."""
    import jax.numpy as jnp

    def out_dtype(key):
        src = np.dtype(source.dtype(key))
        return np.dtype(jnp.dtype(dtype)) if dtype is not None and src.kind in "fV" else src

    specs = [(path, out_dtype(plan[path][0]), tuple(flat[path].shape)) for path in flat]

    def produce(path):
        key, op = plan[path]
        return np.asarray(_apply(op, source[key], patch), order="C").astype(out_dtype(key), copy=False)

    return specs, produce


def convert_transformers_arrays(arrays: Mapping[str, Any], config: Mapping[str, Any]):
    """In memory: a transformers state dict (torch tensors or arrays) and its config dict -> ``(family, params, Config)``."""
    from jdq.models.base import unflatten_params

    source = ArraySource(arrays)
    family, cfg, flat, plan, skipped = plan_source(source, config)
    patch = check_plan(source, flat, plan, skipped, cfg, f"transformers {describe(config)} state dict")
    _, produce = converted_tensors(source, flat, plan, patch, dtype=np.float32)
    params = unflatten_params({p: produce(p) for p in flat}, _abstract(family, cfg))
    return family, params, cfg


def _abstract(family, cfg):
    from jdq import models

    return models.from_config(cfg, abstract=True).params


def read_transformers_config(folder: str | os.PathLike) -> dict:
    """The ``config.json`` dict of a transformers folder (errors name the file)."""
    p = Path(folder) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{folder}: not a transformers model folder (no config.json)")
    try:
        config = json.loads(p.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{p}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{p}: expected a JSON object (a model config), found a JSON {type(config).__name__}")
    return config


#: Tokenizer and image-processor files copied beside a converted encoder (what jdq's tokenizers and
#: CLIP score read from the model folder).
SIDE_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "merges.txt", "preprocessor_config.json")


def convert_transformers_folder(in_dir, out_dir, dtype=None, overwrite: bool = False) -> Path:
    """A transformers encoder folder -> jdq model folder ``out_dir`` (streamed, atomically); returns it.

    Tokenizer / image-processor files in the folder (:data:`SIDE_FILES`) are copied beside the weights.
    """
    import shutil

    from jdq.models.base import CONFIG_FILE, FORMAT_VERSION, PARAMS_FILE, write_folder_atomically
    from jdq.models.streaming import write_safetensors

    config = read_transformers_config(in_dir)
    family_of_config(config)  # a decoder or an unsupported model fails before any weight is read
    source = WeightsFolder(in_dir)
    family, cfg, flat, plan, skipped = plan_source(source, config)
    what = f"transformers {describe(config)} folder {in_dir}"
    patch = check_plan(source, flat, plan, skipped, cfg, what)
    specs, produce = converted_tensors(source, flat, plan, patch, dtype)

    def write(tmp: Path):
        write_safetensors(tmp / PARAMS_FILE, specs, produce,
                          metadata={"family": family, "jdq_format": str(FORMAT_VERSION)})
        (tmp / CONFIG_FILE).write_text(json.dumps({"family": family, "jdq_format": FORMAT_VERSION, **cfg.to_dict()},
                                                  indent=2) + "\n")
        for name in SIDE_FILES:
            if (Path(in_dir) / name).is_file():
                shutil.copyfile(Path(in_dir) / name, tmp / name)

    return write_folder_atomically(out_dir, write, overwrite=overwrite)
