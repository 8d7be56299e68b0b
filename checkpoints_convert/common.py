"""Reading checkpoints safely and mapping their tensors onto jdq params with every key checked.

* :func:`read_torch_checkpoint`: a PyTorch ``.pt`` file through ``torch.load(weights_only=True)``
  (PyTorch's restricted unpickler: a pickle that tries to import or call anything beyond
  tensors and containers is refused).
* :func:`read_diffusers_folder`: ``config.json`` + one or several ``*.safetensors`` (a sharded
  ``*.safetensors.index.json`` too) as ``(config, {key: numpy array})``.
* :class:`StateDict`: hands out tensors by key with their expected shape and, at the end, fails
  on any key left unconsumed; every error names the key (and both shapes).

Tensors become float32 numpy arrays (bf16/fp16 sources are widened) unless a caller asks for
another dtype when saving.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model (names the key and the shapes)."""


def _to_numpy(t) -> np.ndarray:
    """A torch tensor or array-like as a numpy array (bf16/fp16 widened to float32)."""
    if hasattr(t, "detach"):  # torch.Tensor
        import torch

        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float32)
        return t.numpy()
    a = np.asarray(t)
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    return a


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch checkpoint (``torch.save`` output), read without running code.

    Uses ``torch.load(..., weights_only=True)``; ``argparse.Namespace`` is the one extra class
    allowed (facebookresearch/DiT training checkpoints store their ``args``), and constructing
    it runs no code. A checkpoint holding ``{"model", "ema", ...}`` yields its ``"ema"`` weights
    (else ``"model"``), as facebookresearch/DiT's ``find_model`` does.
    """
    import argparse
    import pickle

    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder; a DiT or Inception checkpoint is a .pt/.pth file "
                              f"(a diffusers model folder converts with kind 'diffusers')")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{p}: reading a PyTorch checkpoint needs PyTorch; install jdq with the [torch] extra "
                              f"(pip install 'jdq[torch]')") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; quote only the line naming what was asked for.
        lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        why = f" ({lines[0]})" if lines else ""
        raise CheckpointError(f"{p}: refused to load: the pickle asks for something other than tensors{why}. "
                              f"jdq reads checkpoints with torch.load(weights_only=True) and never runs code "
                              f"from a checkpoint; re-save the weights as a plain state dict.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot read PyTorch checkpoint ({type(e).__name__}: {e}); "
                              f"is it truncated or corrupt?") from None
    if isinstance(obj, Mapping) and ("ema" in obj or "model" in obj) and not any(
            hasattr(v, "shape") for v in obj.values()):
        obj = obj["ema"] if "ema" in obj else obj["model"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: expected a state dict (a mapping of names to tensors), found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not hasattr(v, "shape"):
            raise CheckpointError(f"{p}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[str(k)] = _to_numpy(v)
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return {k: _to_numpy(v) for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None


def read_diffusers_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, state_dict)`` of a diffusers model folder.

    The weights are every ``*.safetensors`` file in the folder, or, when a
    ``*.safetensors.index.json`` is present, exactly the shards its ``weight_map`` names (each
    key must be in the shard the index says). Duplicate keys across files are an error.
    """
    d = Path(folder)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: not a diffusers model folder (no config.json)")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{cfg_path}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object (a diffusers config), found a JSON "
                              f"{type(config).__name__}")
    indices = sorted(d.glob("*.safetensors.index.json"))
    state: dict[str, np.ndarray] = {}
    if indices:
        if len(indices) > 1:
            raise CheckpointError(f"{d}: several shard indices {[i.name for i in indices]}; keep one")
        try:
            weight_map = json.loads(indices[0].read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise KeyError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{indices[0]}: not a safetensors index (no weight_map: {e})") from None
        for shard in sorted(set(weight_map.values())):
            sp = d / shard
            if not sp.is_file():
                raise CheckpointError(f"{indices[0]}: shard {shard!r} is missing from {d}")
            tensors = _read_safetensors(sp)
            for k, v in tensors.items():
                if weight_map.get(k) != shard:
                    raise CheckpointError(f"{sp}: key {k!r} is not assigned to this shard by {indices[0].name}")
                state[k] = v
        absent = sorted(k for k in weight_map if k not in state)
        if absent:
            raise CheckpointError(f"{indices[0]}: {len(absent)} indexed key(s) not found in their shards, e.g. {absent[:5]}")
    else:
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{d}: no *.safetensors weights (only safetensors are read; convert .bin first)")
        for f in files:
            for k, v in _read_safetensors(f).items():
                if k in state:
                    raise CheckpointError(f"{d}: key {k!r} appears in more than one safetensors file")
                state[k] = v
    return config, state


class StateDict:
    """A source state dict whose tensors are taken once each, with shape checks.

    ``take(key, shape)`` returns the tensor (shape-checked); :meth:`finish` raises if any key
    was never taken. Errors name the key, the expected and the found shape.
    """

    def __init__(self, tensors: Mapping[str, Any], what: str = "checkpoint"):
        self.tensors = dict(tensors)
        self.what = what
        self.taken: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` (without consuming it)."""
        if key not in self.tensors:
            raise CheckpointError(f"{self.what}: missing key {key!r}")
        return tuple(np.shape(self.tensors[key]))

    def take(self, key: str, shape: Iterable[int] | None = None) -> np.ndarray:
        """Consume ``key``, checking its shape against ``shape`` (if given)."""
        if key not in self.tensors:
            exp = "" if shape is None else f" (expected shape {tuple(shape)})"
            raise CheckpointError(f"{self.what}: missing key {key!r}{exp}")
        if key in self.taken:
            raise CheckpointError(f"{self.what}: key {key!r} consumed twice (converter bug)")
        a = np.asarray(self.tensors[key])
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"{self.what}: key {key!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        self.taken.add(key)
        return a

    def finish(self):
        """Fail if any source key was not consumed."""
        left = sorted(set(self.tensors) - self.taken)
        if left:
            shown = ", ".join(f"{k} {tuple(np.shape(self.tensors[k]))}" for k in left[:10])
            raise CheckpointError(f"{self.what}: {len(left)} unexpected key(s) not used by the model: {shown}"
                                  + (" ..." if len(left) > 10 else ""))


def linear_weight(sd: StateDict, key: str, d_in: int, d_out: int) -> np.ndarray:
    """A PyTorch ``nn.Linear`` weight (out, in) at ``key`` as a jdq kernel (in, out)."""
    return np.ascontiguousarray(sd.take(key, (d_out, d_in)).T)


def conv_weight(sd: StateDict, key: str, c_in: int, c_out: int, k: int) -> np.ndarray:
    """A PyTorch ``nn.Conv2d`` weight (out, in, k, k) at ``key`` as HWIO (k, k, in, out)."""
    return np.ascontiguousarray(sd.take(key, (c_out, c_in, k, k)).transpose(2, 3, 1, 0))


def patch_conv_weight(sd: StateDict, key: str, c_in: int, c_out: int, p: int) -> np.ndarray:
    """A stride-``p`` ``p``×``p`` conv weight (out, in, p, p) as the (p·p·in, out) kernel of a PatchEmbed."""
    return np.ascontiguousarray(conv_weight(sd, key, c_in, c_out, p).reshape(p * p * c_in, c_out))


def check_like(params, abstract_params, what: str):
    """Check converted ``params`` against the model's abstract params: same names, same shapes."""
    from jdq.models.base import flatten_params

    got, want = flatten_params(params), flatten_params(abstract_params)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(f"{what}: converter produced wrong params: missing {missing[:5]}, extra {extra[:5]}")
    for k, ref in want.items():
        if tuple(np.shape(got[k])) != tuple(ref.shape):
            raise CheckpointError(f"{what}: param {k!r} has shape {tuple(np.shape(got[k]))}, "
                                  f"the model expects {tuple(ref.shape)}")
