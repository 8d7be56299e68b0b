"""Sharded, resumable, multi-process evaluation runs: one atomic ``.npz`` per shard in a run folder.

A run folder holds ``settings.json`` (everything that determines the samples: model and its hash,
recipe, sampler, guidance, seed, sample count, shard and batch size, feature extractor, devices
per process) and ``shard-00000.npz``, ``shard-00001.npz``, … — shard ``s`` holds samples
``[s·S, min((s+1)·S, N))`` (``index``, ``labels``, the uint8 ``images`` and their features).

* **Resume.** A shard file appears only complete (:func:`jdq.io.atomic_write`: a temporary file
  renamed into place), so after a kill every shard on disk is whole and the run continues with
  the missing ones. Sample ``j`` always uses the noise key ``fold_in(key(seed), j)`` and every
  shard is sampled in the same batches, so a resumed run's shards equal an uninterrupted run's
  bit for bit, and so do the metrics computed from them.
* **Other settings.** A folder whose ``settings.json`` differs from this run's is refused (the
  error names the differing keys); shards of different runs are never mixed and nothing is removed.
* **Several processes** (``jax.distributed``): process ``p`` of ``P`` samples the shards
  ``s ≡ p (mod P)``; after a barrier, process 0 reads all shards (the run folder must be on a file
  system every process sees, as usual for multi-host jobs) and computes the metrics. A shard is
  computed by exactly the same code whichever process computes it, so ``P`` processes give the
  numbers of one.

Memory: a process holds one shard (its images and features) at a time while sampling; reading a
finished run holds the requested arrays of all shards (for Inception features about 20 KB per
sample: 200 MB for 10,000), which precision / recall need anyway; images are read only where a
metric needs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from jdq.io import atomic_write, atomic_write_text

SETTINGS_FILE = "settings.json"


class RunFolderError(ValueError):
    """A run folder that cannot be used for this run (other settings, missing or foreign shards)."""


def shard_name(s: int) -> str:
    """File name of shard ``s``."""
    return f"shard-{s:05d}.npz"


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of every shard."""
    if num_samples < 1 or shard_size < 1:
        raise ValueError(f"need num_samples >= 1 and shard_size >= 1, got {num_samples} and {shard_size}")
    return [(a, min(a + shard_size, num_samples)) for a in range(0, num_samples, shard_size)]


def _canonical(settings: Mapping) -> dict:
    return json.loads(json.dumps(dict(settings), sort_keys=True))


def prepare(folder, settings: Mapping) -> Path:
    """Create the run folder, or check that its ``settings.json`` equals ``settings`` (else RunFolderError)."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"run folder {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    want = _canonical(settings)
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunFolderError(f"{path}: not valid JSON ({e}); move the folder away or give another --out") from None
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            shown = "; ".join(f"{k}: folder {have.get(k)!r}, this run {want.get(k)!r}" for k in diff[:6])
            raise RunFolderError(f"{out} holds a run with other settings ({shown}{' ...' if len(diff) > 6 else ''}); "
                                 f"its shards are not mixed with this run's: give another --out or move it away")
    else:
        stray = sorted(p.name for p in out.glob("shard-*.npz"))
        if stray:
            raise RunFolderError(f"{out} has shards ({stray[0]} ...) but no {SETTINGS_FILE}: not a run of this "
                                 f"version; give another --out")
        atomic_write_text(path, json.dumps(want, indent=2, sort_keys=True) + "\n")
    return out


def _is_complete(path: Path, start: int, stop: int) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            return "index" in z.files and np.array_equal(z["index"], np.arange(start, stop))
    except (OSError, ValueError, EOFError):
        return False


def complete_shards(folder, num_samples: int, shard_size: int) -> list[int]:
    """The shards of the run whose files are on disk and whole."""
    out = Path(folder)
    return [s for s, (a, b) in enumerate(shard_ranges(num_samples, shard_size))
            if _is_complete(out / shard_name(s), a, b)]


def run(folder, num_samples: int, shard_size: int, make_shard: Callable[[int, int], Mapping[str, np.ndarray]], *,
        process_index: int = 0, process_count: int = 1, progress: bool = True, desc: str = "shards") -> list[int]:
    """Compute this process's missing shards with ``make_shard(start, stop)``; returns the shards it computed.

    ``make_shard`` returns arrays with a leading axis of ``stop - start``; ``index`` is added.
    """
    out = Path(folder)
    ranges = shard_ranges(num_samples, shard_size)
    mine = [s for s in range(len(ranges)) if s % process_count == process_index]
    for s in mine:  # temporary files of this process's shards left by a killed run
        for tmp in out.glob(f".shard-{s:05d}.*.tmp.npz"):
            tmp.unlink(missing_ok=True)
    todo = [s for s in mine if not _is_complete(out / shard_name(s), *ranges[s])]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, unit="shard")
    try:
        for s in todo:
            a, b = ranges[s]
            arrays = {k: np.asarray(v) for k, v in make_shard(a, b).items()}
            for k, v in arrays.items():
                if v.ndim == 0 or v.shape[0] != b - a:
                    raise ValueError(f"shard {s}: array {k!r} has shape {v.shape}; expected {b - a} rows")
            arrays["index"] = np.arange(a, b)

            def write(tmp, arrays=arrays):
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
            atomic_write(out / shard_name(s), write)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return todo


def load(folder, num_samples: int, shard_size: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The run's arrays (``keys``, default all) concatenated over its shards in sample order."""
    out = Path(folder)
    parts: dict[str, list] = {}
    for s, (a, b) in enumerate(shard_ranges(num_samples, shard_size)):
        path = out / shard_name(s)
        if not _is_complete(path, a, b):
            raise RunFolderError(f"{out}: shard {s} ({path.name}, samples {a}..{b - 1}) is missing or incomplete")
        with np.load(path, allow_pickle=False) as z:
            names = z.files if keys is None else list(keys)
            for k in names:
                if k not in z.files:
                    raise RunFolderError(f"{path}: no array {k!r} (has {z.files})")
                parts.setdefault(k, []).append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def barrier(name: str, process_count: int) -> None:
    """Wait until every process reaches ``name`` (no-op for one process)."""
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

