"""Fréchet distance between feature sets (FID, sFID, Animal-FID) and streamed Gaussian statistics.

``fid(features_a, features_b)`` fits a Gaussian to each set (mean and the unbiased ``N - 1``
covariance, as ``np.cov``) and returns the Fréchet distance between the two Gaussians,

    ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr (Σ_a Σ_b)^½,

in float64 whatever the input dtype. ``tr (Σ_a Σ_b)^½`` is computed as the sum of the square roots
of the eigenvalues of the symmetric PSD matrix ``Σ_b^½ Σ_a Σ_b^½`` (similar to ``Σ_a Σ_b``, so the
same eigenvalues; negative rounding residue clipped to 0), with ``Σ_b^½`` from a symmetric
eigendecomposition. This equals torch-fidelity's eigenvalues of ``Σ_a Σ_b`` and pytorch-fid's / the
ADM evaluator's ``scipy.linalg.sqrtm`` trace (tests: 1e-6 relative, in practice ~1e-9 even for
rank-deficient sets) and is cheaper: ``Σ_b^½`` of a reference is computed once
(:func:`psd_sqrt`), and for a set of ``n < d`` samples the eigenvalues come from the ``n × n``
matrix ``Y Yᵀ`` with ``Y = X_c Σ_b^½ / √(n − 1)`` (``X_c`` the centred rows) instead of ``d × d``.

:class:`GaussianStats` accumulates ``(n, mean, M)`` (``M``: the sum of outer products of the
deviations from the mean) over batches with the pairwise update of Chan, Golub & LeVeque, so
statistics stream: memory is ``O(d²)`` (``d`` the feature width: 32 MiB of float64 for 2048),
independent of the number of samples, and the result equals ``np.mean`` / ``np.cov`` of all rows
to float64 rounding. Statistics merge (``a.merge(b)``), which is how a leave-one-group-out
jackknife (:mod:`jdq.metrics.intervals`) gets each subset's statistics without a second pass.

Fewer samples than ``d + 1`` leave the covariance rank-deficient; the distance is still computed
(as the references do) and a :class:`RankDeficientWarning` says so.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np


class RankDeficientWarning(UserWarning):
    """A covariance estimated from no more samples than feature dimensions (rank < width)."""


def as_features(x, what: str = "features") -> np.ndarray:
    """``x`` as a float64 ``[N, d]`` array; a clear error for other ranks, no rows, NaN or Inf."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array [samples, width], got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{what}: no samples")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{what}: expected real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        bad = int(np.sum(~np.all(np.isfinite(a), axis=1)))
        raise ValueError(f"{what}: {bad} of {a.shape[0]} rows contain NaN or Inf")
    return a


def check_same_width(a: np.ndarray, b: np.ndarray, what_a: str = "first set", what_b: str = "second set"):
    """Raise a ValueError naming both widths when ``a`` and ``b`` (``[N, d]``) differ in width."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"feature widths differ: {what_a} has {a.shape[-1]}, {what_b} has {b.shape[-1]}")


@dataclasses.dataclass(frozen=True)
class GaussianStats:
    """Streamed mean and covariance of feature rows: ``n`` rows, ``mean`` ``[d]``, ``m2`` ``[d, d]`` (float64).

    ``GaussianStats.empty(d)``, then ``stats = stats.update(batch)`` per batch (or
    ``GaussianStats.of(features)``); ``stats.mu`` and ``stats.sigma`` (``N - 1`` normalised).
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, width: int) -> "GaussianStats":
        """Statistics of no rows, of feature width ``width``."""
        return cls(0, np.zeros(width), np.zeros((width, width)))

    @classmethod
    def of(cls, features) -> "GaussianStats":
        """Statistics of the rows of ``features`` ``[N, d]``."""
        x = as_features(features)
        mean = x.mean(axis=0)
        dev = x - mean
        return cls(x.shape[0], mean, dev.T @ dev)

    @classmethod
    def from_moments(cls, mu, sigma, n: int) -> "GaussianStats":
        """Statistics with mean ``mu`` and covariance ``sigma`` estimated from ``n`` rows (e.g. a reference file)."""
        mu = np.asarray(mu, np.float64)
        sigma = np.asarray(sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"statistics: mu must be [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
        return cls(int(n), mu, sigma * max(int(n) - 1, 1))

    @property
    def width(self) -> int:
        """Feature width ``d``."""
        return int(self.mean.shape[0])

    @property
    def mu(self) -> np.ndarray:
        """The mean ``[d]``."""
        return self.mean

    @property
    def sigma(self) -> np.ndarray:
        """The unbiased covariance ``[d, d]`` (``M / (n - 1)``, as ``np.cov``)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, these statistics have {self.n}")
        return self.m2 / (self.n - 1)

    def merge(self, other: "GaussianStats") -> "GaussianStats":
        """Statistics of the union of both row sets (Chan et al.'s pairwise update)."""
        if other.width != self.width:
            raise ValueError(f"feature widths differ: {self.width} and {other.width}")
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        return GaussianStats(n, mean, m2)

    def update(self, batch) -> "GaussianStats":
        """Statistics with the rows of ``batch`` ``[B, d]`` added."""
        b = GaussianStats.of(batch)
        if b.width != self.width:
            raise ValueError(f"feature widths differ: the statistics have {self.width}, the batch {b.width}")
        return self.merge(b)


def _warn_rank(n: int, d: int, what: str):
    if n <= d:
        warnings.warn(f"{what}: {n} samples for {d}-dimensional features: the covariance is rank-deficient "
                      f"(rank <= {n - 1}); the Fréchet distance is computed anyway, as torch-fidelity and "
                      f"pytorch-fid do, but it is dominated by the missing directions",
                      RankDeficientWarning, stacklevel=3)


def psd_sqrt(sigma) -> np.ndarray:
    """The symmetric square root of a covariance (eigenvalues below 0, rounding residue, clipped)."""
    w, v = np.linalg.eigh(np.asarray(sigma, np.float64))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _sum_sqrt_eigvalsh(m) -> float:
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None))))


def trace_sqrt_product(sigma_a, sqrt_b) -> float:
    """``tr (Σ_a Σ_b)^½`` from ``Σ_a`` and ``Σ_b^½`` (:func:`psd_sqrt`)."""
    return _sum_sqrt_eigvalsh(sqrt_b @ sigma_a @ sqrt_b)


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b, sqrt_b=None) -> float:
    """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b), in float64 (``sqrt_b``: ``psd_sqrt(sigma_b)``)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    if mu_a.ndim != 1 or mu_b.ndim != 1:
        raise ValueError(f"means must be vectors, got shapes {mu_a.shape} and {mu_b.shape}")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature widths differ: {mu_a.shape[0]} and {mu_b.shape[0]}")
    d = mu_a.shape[0]
    for s, name in ((sigma_a, "sigma_a"), (sigma_b, "sigma_b")):
        if s.shape != (d, d):
            raise ValueError(f"{name} has shape {s.shape}; expected ({d}, {d}) for {d}-wide means")
    for v, name in ((mu_a, "mu_a"), (mu_b, "mu_b"), (sigma_a, "sigma_a"), (sigma_b, "sigma_b")):
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} contains NaN or Inf")
    diff = mu_a - mu_b
    tr_covmean = trace_sqrt_product(sigma_a, psd_sqrt(sigma_b) if sqrt_b is None else sqrt_b)
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean)


def fid_to_reference(features, reference: "GaussianStats", sqrt_ref=None) -> float:
    """FID of feature rows ``[n, d]`` to reference statistics; ``n × n`` eigenvalues when ``n < d``."""
    x = as_features(features, "generated features")
    check_same_width(x, reference.mu[None], "the generated features", "the reference")
    n, d = x.shape
    _warn_rank(n, d, "generated set")
    sqrt_ref = psd_sqrt(reference.sigma) if sqrt_ref is None else sqrt_ref
    mean = x.mean(axis=0)
    if n > d:
        dev = x - mean
        return frechet_distance(mean, dev.T @ dev / (n - 1), reference.mu, reference.sigma, sqrt_ref)
    y = (x - mean) @ sqrt_ref / np.sqrt(n - 1)
    diff = mean - reference.mu
    tr_a = float(np.sum((x - mean) ** 2)) / (n - 1)
    return float(diff @ diff + tr_a + np.trace(reference.sigma) - 2.0 * _sum_sqrt_eigvalsh(y @ y.T))


def fid_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    """Fréchet distance between two :class:`GaussianStats` (a rank-deficient one warns)."""
    _warn_rank(a.n, a.width, "first set")
    _warn_rank(b.n, b.width, "second set")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def fid(features_a, features_b) -> float:
    """FID between two feature sets ``[N_a, d]`` and ``[N_b, d]`` (any width ``d``; float64 inside)."""
    a = as_features(features_a, "first set")
    b = as_features(features_b, "second set")
    check_same_width(a, b)
    return fid_from_stats(GaussianStats.of(a), GaussianStats.of(b))  # (a, b) symmetric in exact arithmetic


#: ADM's sFID: the first 7 channels of the ``mixed_6/conv`` feature map (17×17), flattened (2023 values).
SFID_CHANNELS = 7


def sfid(spatial_a, spatial_b) -> float:
    """sFID: FID of spatial features ``[N, 17·17·7]`` (``jdq.models.inception``'s ``spatial``) or ``[N, 17, 17, C]``."""
    def flat(x, what):
        x = np.asarray(x)
        if x.ndim == 4:
            x = x[..., :SFID_CHANNELS].reshape(x.shape[0], -1)
        return as_features(x, what)
    return fid(flat(spatial_a, "first set"), flat(spatial_b, "second set"))
