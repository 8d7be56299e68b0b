"""A quantized model on disk (``jdq quantize --out DIR``) and back, without recalibrating.

``DIR`` holds:

* ``quantized.json`` — the recipe, its version and options (after any search), the model
  (folder, a fingerprint of its parameters, its config), the calibration settings and the
  sampler it ran along, and the SHA-256 of every file below;
* ``state.safetensors`` — the calibrated state (every array of every operand's state; the
  nesting, with ``None`` entries, is a JSON skeleton in the file's header);
* ``params.safetensors`` — only the parameters the recipe re-parameterised (PTQ4DiT's folding,
  Q-DiT's GPTQ weights), absent when none changed;
* ``calibration.safetensors`` — the calibration statistics (resumable while calibrating);
* ``report.json`` / ``report.md`` — per operand its rule and format, realised outlier fractions,
  weight bytes, calibration time and peak memory.

:func:`load` rebuilds the plan from the recipe and its options, reads the state, applies the
parameter overrides and binds: the same :class:`~jdq.recipes.Quantized` as in memory. A folder of
another model, a recipe whose version changed, a truncated or edited file: :class:`SavedError`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdq.recipes.core import Quantized, RecipeError, get, model_operands, plan_for

FORMAT = 1
MANIFEST = "quantized.json"
STATE = "state.safetensors"
PARAMS = "params.safetensors"
CALIBRATION = "calibration.safetensors"


class SavedError(RecipeError):
    """A quantized folder that cannot be used with this model or this version of jdq."""


def params_fingerprint(params) -> str:
    """SHA-256 of every parameter (names, shapes, dtypes, bytes): tells models apart."""
    from jdq.models.base import flatten_params

    h = hashlib.sha256()
    for name, v in sorted(flatten_params(params).items()):
        a = np.ascontiguousarray(np.asarray(v))
        h.update(f"{name}:{a.shape}:{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _skeleton(obj, arrays: dict):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return {"dict": {str(k): _skeleton(v, arrays) for k, v in obj.items()}}
    if isinstance(obj, (tuple, list)):
        return {"tuple" if isinstance(obj, tuple) else "list": [_skeleton(v, arrays) for v in obj]}
    name = f"a{len(arrays)}"
    arrays[name] = np.array(obj)
    return {"array": name}


def _rebuild(node, arrays):
    if node is None:
        return None
    if "dict" in node:
        return {k: _rebuild(v, arrays) for k, v in node["dict"].items()}
    if "tuple" in node:
        return tuple(_rebuild(v, arrays) for v in node["tuple"])
    if "list" in node:
        return [_rebuild(v, arrays) for v in node["list"]]
    return jnp.asarray(arrays[node["array"]])


def _write_safetensors(path: Path, arrays: dict, meta: dict):
    from safetensors.numpy import save

    from jdq.io import atomic_write

    data = save(arrays, metadata={k: json.dumps(v) for k, v in meta.items()})

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def _read_safetensors(path: Path, what: str):
    from safetensors.numpy import load

    try:
        data = path.read_bytes()
        arrays = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
    except FileNotFoundError:
        raise SavedError(f"{path}: the {what} file is missing") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure is a damaged file
        raise SavedError(f"{path}: cannot read the {what} (truncated or damaged: {e})") from None
    return arrays, {k: json.loads(v) for k, v in meta.items()}


def _sha(path: Path) -> str:
    from jdq.io import sha256_file

    return sha256_file(path)


def save(folder, quantized: Quantized, model, *, model_path=None, report: dict | None = None) -> Path:
    """Write ``quantized`` (built for ``model``) into ``folder``; returns the folder."""
    from jdq.io import atomic_write_text
    from jdq.models.base import flatten_params

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    skeleton = _skeleton(dict(quantized.quantizer.state), arrays)
    _write_safetensors(folder / STATE, arrays, {"jdq_state": skeleton})
    base, new = flatten_params(model.params), flatten_params(quantized.params)
    changed = {k: np.array(v) for k, v in new.items()
               if not np.array_equal(np.asarray(v), np.asarray(base[k]))}
    files = {STATE: _sha(folder / STATE)}
    if changed:
        _write_safetensors(folder / PARAMS, changed, {"jdq_params": sorted(changed)})
        files[PARAMS] = _sha(folder / PARAMS)
    elif (folder / PARAMS).exists():
        (folder / PARAMS).unlink()
    info = dict(quantized.info)
    manifest = {
        "jdq_quantized": FORMAT,
        "recipe": info["recipe"], "version": info["version"], "options": info["options"],
        "calibration": info.get("calibration"),
        "model": {"path": None if model_path is None else str(Path(model_path).resolve()),
                  "fingerprint": params_fingerprint(model.params), "family": model.family,
                  "config": model.config.to_dict()},
        "files": files,
    }
    if report is not None:
        atomic_write_text(folder / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    return folder


def is_quantized_folder(path) -> bool:
    """Whether ``path`` is a folder written by :func:`save`."""
    return path is not None and (Path(path) / MANIFEST).is_file()


def read_manifest(folder) -> dict[str, Any]:
    """The folder's ``quantized.json`` (checked for its format)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise SavedError(f"{folder} is not a quantized folder (no {MANIFEST}; write one with `jdq quantize`)") from None
    except json.JSONDecodeError as e:
        raise SavedError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("jdq_quantized") != FORMAT:
        raise SavedError(f"{path}: quantized-folder format {manifest.get('jdq_quantized')!r}, this jdq reads {FORMAT}")
    return manifest


def load(folder, model=None) -> tuple[Any, Quantized]:
    """``(model, Quantized)`` from a folder of :func:`save`; ``model=None`` loads the model the folder names."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if model is None:
        from jdq.models import load as load_model

        path = manifest["model"].get("path")
        if not path or not Path(path).is_dir():
            raise SavedError(f"{folder}: its model folder {path!r} does not exist; pass the model explicitly")
        model, _ = load_model(path)
    if params_fingerprint(model.params) != manifest["model"]["fingerprint"]:
        raise SavedError(f"{folder} was quantized from another model (parameter fingerprint differs from "
                         f"{manifest['model'].get('path')}); quantize this model with `jdq quantize`")
    try:
        recipe = get(manifest["recipe"])
    except RecipeError as e:
        raise SavedError(f"{folder}: {e}") from None
    if recipe.version != manifest["version"]:
        raise SavedError(f"{folder}: recipe {recipe.name!r} was version {manifest['version']} when saved, it is "
                         f"{recipe.version} now (its state changed meaning); quantize again")
    for name, digest in manifest["files"].items():
        if not (folder / name).is_file():
            raise SavedError(f"{folder / name}: missing (the folder is incomplete)")
        if _sha(folder / name) != digest:
            raise SavedError(f"{folder / name}: its contents changed since `jdq quantize` wrote it (truncated?)")
    arrays, meta = _read_safetensors(folder / STATE, "state")
    state = _rebuild(meta["jdq_state"], arrays)
    params = model.params
    if PARAMS in manifest["files"]:
        from jdq.models.base import flatten_params, unflatten_params

        over, _ = _read_safetensors(folder / PARAMS, "parameters")
        flat = dict(flatten_params(params))
        flat.update({k: jnp.asarray(v) for k, v in over.items()})
        params = unflatten_params(flat, params)
    from jdq.models.spec import find_spec

    spec = find_spec(model)
    labels = jnp.zeros((1,), jnp.int32) if spec is not None and spec.class_conditional else None
    if labels is None:
        raise SavedError(f"{folder}: loading quantized {model.family} models is not supported yet (DiT only)")
    plan = plan_for(manifest["recipe"], model_operands(model, labels), **manifest["options"])
    missing = [k for k in plan.quantized_keys if k not in state]
    if missing:
        raise SavedError(f"{folder / STATE}: no state for {len(missing)} operand(s), e.g. {missing[:3]}")
    info = {k: manifest[k] for k in ("recipe", "version", "options", "calibration")}
    return model, Quantized(plan, plan.bind(state), params, info)
