"""Reference batches: the ADM evaluator's ``.npz`` (``VIRTUAL_imagenet256_labeled.npz``) and its features.

An ADM reference batch is an ``.npz`` with ``arr_0`` (uint8 images ``[N, H, W, 3]``) and, where
the evaluator wrote them, ``mu`` / ``sigma`` (pool statistics) and ``mu_s`` / ``sigma_s``
(spatial). :func:`read_statistics` reads the statistics; :func:`iter_images` streams ``arr_0`` in
row chunks straight from the zip member (memory: one chunk, not the 2 GB array), and
:func:`reference_from_batch` extracts features chunk by chunk into a :class:`Reference` (FID uses
the file's statistics where present, the features' otherwise; precision / recall use the features).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from jdq.metrics.evaluate import Reference
from jdq.metrics.fid import GaussianStats

IMAGES = "arr_0"
#: Statistic arrays of an ADM reference batch: feature name -> (mean key, covariance key).
STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


def _open(path) -> zipfile.ZipFile:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reference file {p} does not exist")
    try:
        return zipfile.ZipFile(p)
    except zipfile.BadZipFile:
        raise ValueError(f"reference file {p} is not an .npz file") from None


def _members(z: zipfile.ZipFile) -> set[str]:
    return {n[:-4] for n in z.namelist() if n.endswith(".npy")}


def _read_header(f):
    """``(shape, fortran_order, dtype)`` of an open ``.npy`` stream (numpy's public header readers)."""
    fmt = np.lib.format
    major, _ = fmt.read_magic(f)
    return fmt.read_array_header_1_0(f) if major == 1 else fmt.read_array_header_2_0(f)


def read_statistics(path, num_samples: int | None = None) -> dict[str, GaussianStats]:
    """``{"pool": ..., "spatial": ...}`` statistics present in the file (checked: shapes, finite values)."""
    out = {}
    with np.load(path, allow_pickle=False) as z:
        n = num_samples
        for name, (mk, sk) in STAT_KEYS.items():
            if mk in z.files and sk in z.files:
                mu, sigma = z[mk], z[sk]
                if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
                    raise ValueError(f"{path}: {mk} {mu.shape} and {sk} {sigma.shape} are not a mean and covariance")
                if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
                    raise ValueError(f"{path}: {mk}/{sk} contain NaN or Inf")
                out[name] = GaussianStats.from_moments(mu, sigma, n if n is not None else mu.shape[0] + 2)
            elif mk in z.files or sk in z.files:
                raise ValueError(f"{path}: has only one of {mk!r} and {sk!r}")
    return out


def image_count(path) -> int | None:
    """Rows of the file's ``arr_0`` (``None`` without images)."""
    with _open(path) as z:
        if IMAGES not in _members(z):
            return None
        with z.open(IMAGES + ".npy") as f:
            shape, _, _ = _read_header(f)
    return int(shape[0])


def iter_images(path, chunk: int = 500) -> Iterator[np.ndarray]:
    """``arr_0`` in chunks of ``chunk`` rows (uint8 ``[n, H, W, 3]``), read incrementally from the zip member."""
    with _open(path) as z:
        if IMAGES not in _members(z):
            raise ValueError(f"reference file {path} has no images ({IMAGES!r}); found {sorted(_members(z))}")
        with z.open(IMAGES + ".npy") as f:
            shape, fortran, dtype = _read_header(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
                raise ValueError(f"reference file {path}: {IMAGES} must be uint8 [N, H, W, 3] (C order), "
                                 f"found {dtype} {shape}")
            row = int(np.prod(shape[1:]))
            for start in range(0, shape[0], chunk):
                n = min(chunk, shape[0] - start)
                buf = f.read(n * row)
                if len(buf) != n * row:
                    raise ValueError(f"reference file {path}: {IMAGES} is truncated at row {start}")
                yield np.frombuffer(buf, np.uint8).reshape((n,) + tuple(shape[1:]))


def reference_from_batch(path, extract: Callable[[np.ndarray], Mapping[str, np.ndarray]] | None,
                         keys: tuple[str, ...] = ("pool", "spatial"), chunk: int = 500,
                         progress: bool = False) -> Reference:
    """A :class:`Reference` from an ADM-style batch: its statistics, plus ``extract``'s features of its images."""
    count = image_count(path)
    stats = read_statistics(path, count)
    features: dict[str, np.ndarray] = {}
    if count is not None and extract is not None:
        parts: dict[str, list] = {k: [] for k in keys}
        chunks = iter_images(path, chunk)
        if progress:
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, total=-(-count // chunk), desc="reference features", unit="chunk")
        for images in chunks:
            out = extract(images)
            for k in keys:
                parts[k].append(np.asarray(out[k], np.float32))
        features = {k: np.concatenate(v) for k, v in parts.items()}
    if not stats and not features:
        raise ValueError(f"reference file {path} has neither images ({IMAGES!r}) nor statistics (mu, sigma)")
    return Reference(Path(path).name, stats, features)
