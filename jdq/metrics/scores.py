"""Inception Score, precision / recall (Kynkäänniemi et al., 2019) and KID, on feature arrays (float64).

* :func:`inception_score`: ``exp E_x KL(p(y|x) ‖ p(y))`` per split, the softmax of the given
  logits (torch-fidelity's and the ADM evaluator's IS use the pool features times the final
  layer's weights *without* its bias: ``jdq.models.inception``'s ``logits``). The splits are taken
  in order without shuffling — ``splits`` equal parts with boundaries ``i·N // splits`` as
  torch-fidelity (``shuffle=False``), or consecutive chunks of ``split_size`` as the ADM evaluator
  (5,000) — and the result is ``(mean, std)`` over the splits (``std`` with ``ddof=0``).
* :func:`precision_recall`: a generated sample is *precise* if it lies within the k-NN radius
  (distance to its k-th nearest neighbour, itself excluded) of some real sample; a real sample is
  *recalled* if it lies within the k-NN radius of some generated sample (``<=``, Euclidean), as
  torch-fidelity's ``prc``. Distances are computed in row blocks: memory is
  ``O(block · max(N_real, N_gen))``, never ``N²``.
* :func:`kid`: the unbiased estimator of the squared MMD with the cubic polynomial kernel
  ``(x·y / d + 1)³`` on all samples (unequal set sizes allowed), blockwise; :func:`kid_subsets`:
  torch-fidelity's mean and std over random subsets (seeded ``np.random.RandomState``).
"""

from __future__ import annotations

import numpy as np

from jdq.metrics.fid import as_features, check_same_width

#: Rows of a distance or kernel block: a block is ``BLOCK_ROWS × N`` float64 (80 MB for N = 10,000 at 1000 rows).
BLOCK_ROWS = 1000


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score(logits, splits: int = 10, split_size: int | None = None) -> tuple[float, float]:
    """``(mean, std)`` of the Inception Score over in-order splits of ``logits`` ``[N, classes]``.

    ``split_size`` (e.g. 5,000, the ADM evaluator's) overrides ``splits``: consecutive chunks of
    that many rows, the last one shorter.
    """
    z = as_features(logits, "logits")
    n = z.shape[0]
    if split_size is not None:
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        bounds = [(s, min(s + split_size, n)) for s in range(0, n, split_size)]
    else:
        if not 1 <= splits <= n:
            raise ValueError(f"splits must lie in 1..{n} (the number of samples), got {splits}")
        bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    log_p = _log_softmax(z)
    p = np.exp(log_p)
    scores = []
    for lo, hi in bounds:
        pc, lpc = p[lo:hi], log_p[lo:hi]
        q = pc.mean(axis=0, keepdims=True)
        kl = np.sum(pc * (lpc - np.log(q)), axis=1).mean()
        scores.append(float(np.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_norms(x):
    return np.einsum("ij,ij->i", x, x)


def _distances(a, b, a_sq, b_sq):
    """Euclidean distances ``[len(a), len(b)]`` via ‖a‖² + ‖b‖² − 2 a·b (clipped at 0)."""
    d2 = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(d2, 0.0))


def knn_radii(x, k: int = 3, block: int = BLOCK_ROWS) -> np.ndarray:
    """Distance from each row of ``x`` ``[N, d]`` to its k-th nearest other row (the (k+1)-th smallest, self included)."""
    x = as_features(x)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must lie in 1..{n - 1} for {n} samples, got {k}")
    sq = _sq_norms(x)
    out = np.empty(n)
    for s in range(0, n, block):
        d = _distances(x[s:s + block], x, sq[s:s + block], sq)
        out[s:s + block] = np.partition(d, k, axis=1)[:, k]
    return out


def coverage(points, centers, radii, block: int = BLOCK_ROWS) -> np.ndarray:
    """Whether each row of ``points`` lies within ``radii[j]`` of some row ``j`` of ``centers`` (bool ``[N]``)."""
    p_sq, c_sq = _sq_norms(points), _sq_norms(centers)
    out = np.empty(points.shape[0], bool)
    for s in range(0, points.shape[0], block):
        d = _distances(points[s:s + block], centers, p_sq[s:s + block], c_sq)
        out[s:s + block] = np.any(d <= radii[None, :], axis=1)
    return out


def precision_recall(real, generated, k: int = 3, *, real_radii: np.ndarray | None = None,
                     block: int = BLOCK_ROWS) -> tuple[float, float]:
    """``(precision, recall)`` of ``generated`` against ``real`` features with k-NN manifolds (k = 3 by default).

    ``real_radii``: the real set's :func:`knn_radii` if already computed (they do not depend on
    the generated set, so a jackknife or several models share them).
    """
    real = as_features(real, "real features")
    gen = as_features(generated, "generated features")
    check_same_width(real, gen, "the real features", "the generated features")
    r_real = knn_radii(real, k, block) if real_radii is None else np.asarray(real_radii, np.float64)
    if r_real.shape != (real.shape[0],):
        raise ValueError(f"real_radii has shape {r_real.shape}; expected ({real.shape[0]},)")
    r_gen = knn_radii(gen, k, block)
    precision = float(np.mean(coverage(gen, real, r_real, block)))
    recall = float(np.mean(coverage(real, gen, r_gen, block)))
    return precision, recall


def _poly_kernel_sum(a, b, gamma, coef0, degree, block, exclude_diagonal=False) -> float:
    total = 0.0
    for s in range(0, a.shape[0], block):
        kb = (a[s:s + block] @ b.T * gamma + coef0) ** degree
        if exclude_diagonal:
            idx = np.arange(kb.shape[0])
            kb[idx, s + idx] = 0.0
        total += float(kb.sum())
    return total


def kid(real, generated, *, degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
        block: int = BLOCK_ROWS) -> float:
    """KID: the unbiased squared MMD between ``real`` and ``generated`` with the kernel ``(γ x·y + c)^degree``.

    ``γ`` defaults to ``1 / d``. Uses every sample; the sets may differ in size (each needs >= 2).
    """
    x = as_features(generated, "generated features")
    y = as_features(real, "real features")
    check_same_width(y, x, "the real features", "the generated features")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {m} generated and {n} real")
    g = 1.0 / x.shape[1] if gamma is None else gamma
    kxx = _poly_kernel_sum(x, x, g, coef0, degree, block, exclude_diagonal=True)
    kyy = _poly_kernel_sum(y, y, g, coef0, degree, block, exclude_diagonal=True)
    kxy = _poly_kernel_sum(x, y, g, coef0, degree, block)
    return kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2.0 * kxy / (m * n)


def kid_subsets(real, generated, subsets: int = 100, subset_size: int = 1000, seed: int = 2020, *,
                degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> tuple[float, float]:
    """torch-fidelity's KID: ``(mean, std)`` of :func:`kid` over ``subsets`` random equal-size subsets.

    Subset ``i`` draws ``subset_size`` generated, then ``subset_size`` real indices without
    replacement from one ``np.random.RandomState(seed)``.
    """
    x = as_features(generated, "generated features")
    y = as_features(real, "real features")
    check_same_width(y, x, "the real features", "the generated features")
    if subset_size > min(len(x), len(y)):
        raise ValueError(f"KID subset size {subset_size} exceeds the samples ({len(x)} generated, {len(y)} real)")
    rng = np.random.RandomState(seed)
    vals = np.zeros(subsets)
    for i in range(subsets):
        a = x[rng.choice(len(x), subset_size, replace=False)]
        b = y[rng.choice(len(y), subset_size, replace=False)]
        vals[i] = kid(b, a, degree=degree, gamma=gamma, coef0=coef0)
    return float(np.mean(vals)), float(np.std(vals))
