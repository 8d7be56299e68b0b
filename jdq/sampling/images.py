"""Writing samples: a PNG grid and an ``.npz``, both atomically (temp file in the same folder + rename)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jdq.io import atomic_write, atomic_write_all


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 images ``[N, H, W, C]`` (C = 1 or 3) into one ``[rows·(H+pad)+pad, …, C]`` array."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"make_grid expects uint8 [N, H, W, 1 or 3], got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncol = max(1, min(n, ncol or int(np.ceil(np.sqrt(n)))))
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return grid


def _png_writer(images: np.ndarray, ncol: int | None, scale: int):
    from PIL import Image

    grid = make_grid(images, ncol)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return lambda tmp: img.save(tmp, format="PNG")


def _npz_writer(arrays):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return write


def save_grid(path, images: np.ndarray, ncol: int | None = None, scale: int = 1) -> Path:
    """Write uint8 images ``[N, H, W, C]`` as one PNG grid (nearest-neighbour upscaled by ``scale``)."""
    return atomic_write(path, _png_writer(images, ncol, scale))


def save_npz(path, **arrays) -> Path:
    """Write ``arrays`` to an ``.npz`` file atomically."""
    return atomic_write(path, _npz_writer(arrays))


def save_grid_and_npz(png, npz, images: np.ndarray, arrays: dict, ncol: int | None = None, scale: int = 1):
    """Write the PNG grid and the ``.npz`` as a pair: both to temporary files, then both renamed.

    An interrupt before the renames leaves both previous files as they were (never a new .npz
    beside an old .png); see :func:`jdq.io.atomic_write_all`.
    """
    return atomic_write_all({png: _png_writer(images, ncol, scale), npz: _npz_writer(arrays)})


def to_uint8(x: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """Map values in ``[lo, hi]`` to uint8 ``[0, 255]`` (clipped)."""
    x = (np.asarray(x, np.float32) - lo) / (hi - lo)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
