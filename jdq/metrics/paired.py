"""Paired fidelity to a reference image set (the FP model's images for the same noise): PSNR, SSIM, mean |Δ|.

All three take two image arrays of the same shape ``[N, H, W, C]`` (uint8, or float with an
explicit ``data_range``) and compute in float64 on the host: they are reductions over images
the sampler already produced, cheap beside sampling, and float64 makes them equal to
scikit-image to rounding.

* :func:`mse_per_image`, :func:`psnr` — ``10 log10(R² / MSE)`` with ``R`` the data range (255 for
  uint8); ``psnr`` pools the squared error over every pixel of every image (as torchmetrics'
  ``PeakSignalNoiseRatio`` accumulated over a data set, SVDQuant's and MixDQ's evaluation); ``inf``
  when the sets are identical.
* :func:`ssim_per_image` — scikit-image's ``structural_similarity`` for each image: a uniform
  ``win_size × win_size`` window (odd, at most the image side), ``K1 = 0.01``, ``K2 = 0.03``,
  sample covariances (``NP / (NP − 1)``), the mean over the pixels whose window lies inside the
  image (scikit-image crops ``(win_size − 1) // 2`` from each border before averaging, so no
  padding mode matters) and over channels. MixDQ scores layers with a near-global window (511 on
  512-pixel images); the window sums use integral images, so any window costs the same.
* :func:`mean_abs_diff_per_image` — mean absolute difference in data units (8-bit levels for uint8).
"""

from __future__ import annotations

import math

import numpy as np


def _pair(a, b, data_range):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"paired images must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C], got shape {a.shape}")
    if a.dtype != b.dtype:
        raise ValueError(f"paired images must have the same dtype, got {a.dtype} and {b.dtype}")
    if data_range is None:
        if a.dtype != np.uint8:
            raise ValueError(f"data_range is required for {a.dtype} images (it is 255 only for uint8)")
        data_range = 255.0
    a, b = a.astype(np.float64), b.astype(np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("images contain NaN or Inf")
    return a, b, float(data_range)


def mse_per_image(a, b, data_range: float | None = None) -> np.ndarray:
    """Mean squared error of each image pair ``[N]`` (float64; data units)."""
    x, y, _ = _pair(a, b, data_range)
    return np.mean((x - y) ** 2, axis=(1, 2, 3))


def psnr_from_mse(mse: float, data_range: float = 255.0) -> float:
    """``10 log10(R² / mse)`` (``inf`` for ``mse == 0``)."""
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range ** 2 / mse)


def psnr(a, b, data_range: float | None = None) -> float:
    """PSNR (dB) with the squared error pooled over all images; ``inf`` when identical."""
    _, _, r = _pair(a[:1], b[:1], data_range)
    return psnr_from_mse(float(np.mean(mse_per_image(a, b, data_range))), r)


def mean_abs_diff_per_image(a, b, data_range: float | None = None) -> np.ndarray:
    """Mean absolute difference of each image pair ``[N]`` (data units: 8-bit levels for uint8)."""
    x, y, _ = _pair(a, b, data_range)
    return np.mean(np.abs(x - y), axis=(1, 2, 3))


def _window_means(x, w):
    """Means over every ``w × w`` window lying inside ``x`` ``[N, H, W, C]`` -> ``[N, H-w+1, W-w+1, C]``."""
    s = np.cumsum(np.cumsum(x, axis=1), axis=2)
    s = np.pad(s, ((0, 0), (1, 0), (1, 0), (0, 0)))
    tot = s[:, w:, w:] - s[:, :-w, w:] - s[:, w:, :-w] + s[:, :-w, :-w]
    return tot / (w * w)


def ssim_per_image(a, b, data_range: float | None = None, win_size: int = 7, k1: float = 0.01,
                   k2: float = 0.03) -> np.ndarray:
    """SSIM of each image pair ``[N]``, equal to ``skimage.metrics.structural_similarity(..., channel_axis=-1)``."""
    x, y, r = _pair(a, b, data_range)
    h, w = x.shape[1:3]
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be odd and >= 3, got {win_size}")
    if win_size > min(h, w):
        raise ValueError(f"win_size {win_size} exceeds the image side ({h}×{w})")
    npix = win_size * win_size
    cov_norm = npix / (npix - 1.0)
    ux, uy = _window_means(x, win_size), _window_means(y, win_size)
    uxx, uyy, uxy = (_window_means(x * x, win_size), _window_means(y * y, win_size),
                     _window_means(x * y, win_size))
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2)).mean(axis=-1)


def ssim(a, b, data_range: float | None = None, win_size: int = 7) -> float:
    """Mean SSIM over image pairs (see :func:`ssim_per_image`)."""
    return float(np.mean(ssim_per_image(a, b, data_range, win_size)))


def mean_abs_diff(a, b, data_range: float | None = None) -> float:
    """Mean absolute difference over all pixels of all images."""
    return float(np.mean(mean_abs_diff_per_image(a, b, data_range)))
