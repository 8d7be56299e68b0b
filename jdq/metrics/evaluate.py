"""Every metric of a generated set with its interval, from features already extracted.

:func:`evaluate` takes the generated set's arrays (features, logits, predicted labels, uint8
images) and a :class:`Reference`, and returns ``{metric: Interval}`` for the metrics asked for:

==============  ====================================================================================
``fid``         Fréchet distance of the main features (Inception ``pool``, or the Animal-MNIST
                classifier's penultimate layer) to the reference statistics
``sfid``        the same for the spatial features (ADM's sFID)
``is``          Inception Score of the logits (mean over in-order splits)
``precision``   Kynkäänniemi et al. precision / recall (k = 3) against the reference features
``recall``
``kid``         the unbiased KID against the reference features (all samples)
``agreement``   fraction of samples a classifier labels with their conditioning class
``dfid``        FID minus the FP model's FID (same noise, same reference), with a *paired* interval
``psnr``        paired with the FP model's images of the same noise: pooled PSNR (dB),
``ssim``        mean SSIM (window 7) and mean |Δ| (8-bit levels)
``mad``
==============  ====================================================================================

``dfid`` separates recipes that the FID intervals alone cannot: the quantized and the FP samples
share their noise, so most of the sampling noise cancels in the difference. Its jackknife leaves
the same group out of both sets (a smooth function of the joint sample moments of the pairs).

Intervals: the grouped jackknife of :mod:`jdq.metrics.intervals` over contiguous groups of the
generated samples (the reference fixed), except IS (mean ± t·std/√(splits − 1) over its splits).
FID's jackknife computes the reference's ``Σ^½`` once; each leave-one-group-out FID is then one
symmetric eigenvalue problem (``n × n`` when the subset has fewer samples than features).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Mapping, Sequence

import numpy as np

from jdq.metrics import intervals as I
from jdq.metrics import paired, scores
from jdq.metrics.fid import GaussianStats, RankDeficientWarning, as_features, fid_to_reference, psd_sqrt

METRICS = ("fid", "sfid", "is", "precision", "recall", "kid", "agreement", "dfid", "psnr", "ssim", "mad")
#: Metrics that need the FP model's run of the same noise (its images; its features for ``dfid``).
PAIRED = ("dfid", "psnr", "ssim", "mad")


@dataclasses.dataclass(frozen=True)
class Reference:
    """Reference statistics and (optionally) features: ``stats`` and ``features`` keyed by feature name."""

    name: str
    stats: Mapping[str, GaussianStats]
    features: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def stats_of(self, key: str) -> GaussianStats:
        """The statistics of feature ``key`` (computed from the features when only those are present)."""
        if key in self.stats:
            return self.stats[key]
        if key in self.features:
            return GaussianStats.of(self.features[key])
        raise KeyError(f"reference {self.name!r} has no statistics or features {key!r} "
                       f"(has statistics {sorted(self.stats)}, features {sorted(self.features)})")

    def features_of(self, key: str) -> np.ndarray:
        """The features ``key`` of the reference images (precision / recall / KID need them)."""
        if key not in self.features:
            raise KeyError(f"reference {self.name!r} has no {key!r} features (only statistics): "
                           f"precision, recall and KID need the reference images or their features")
        return self.features[key]


def fid_interval(features, reference: GaussianStats, groups: int = I.GROUPS) -> I.Interval:
    """FID of ``features`` ``[N, d]`` to ``reference`` with its grouped-jackknife interval."""
    x = as_features(features, "generated features")
    if x.shape[1] != reference.width:
        raise ValueError(f"feature widths differ: the generated features have {x.shape[1]}, "
                         f"the reference {reference.width}")
    sqrt_ref = psd_sqrt(reference.sigma)
    full = fid_to_reference(x, reference, sqrt_ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientWarning)  # said once, for the full set
        leave = [fid_to_reference(np.delete(x, idx, axis=0), reference, sqrt_ref)
                 for idx in I.contiguous_groups(x.shape[0], groups)]
    return I.jackknife_from_values(full, leave, bounds=(0.0, np.inf))


def fid_delta_interval(features, fp_features, reference: GaussianStats, groups: int = I.GROUPS) -> I.Interval:
    """``FID(features) − FID(fp_features)`` (paired rows: the same noise) with a paired grouped-jackknife interval."""
    x = as_features(features, "generated features")
    y = as_features(fp_features, "FP features")
    if x.shape != y.shape:
        raise ValueError(f"paired feature sets differ in shape: {x.shape} and {y.shape}")
    sqrt_ref = psd_sqrt(reference.sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientWarning)
        full = fid_to_reference(x, reference, sqrt_ref) - fid_to_reference(y, reference, sqrt_ref)
        leave = [fid_to_reference(np.delete(x, idx, axis=0), reference, sqrt_ref)
                 - fid_to_reference(np.delete(y, idx, axis=0), reference, sqrt_ref)
                 for idx in I.contiguous_groups(x.shape[0], groups)]
    return I.jackknife_from_values(full, leave, method=f"paired grouped jackknife ({groups} contiguous groups, "
                                                       f"t_{groups - 1})")


def precision_recall_intervals(real, generated, k: int = 3, groups: int = I.GROUPS) -> tuple[I.Interval, I.Interval]:
    """Precision and recall with grouped-jackknife intervals (the real k-NN radii computed once)."""
    real = as_features(real, "reference features")
    gen = as_features(generated, "generated features")
    radii = scores.knn_radii(real, k)
    n = gen.shape[0]
    parts = I.contiguous_groups(n, groups)
    full = scores.precision_recall(real, gen, k, real_radii=radii)
    everything = np.arange(n)
    leave = [scores.precision_recall(real, gen[np.setdiff1d(everything, p, assume_unique=True)], k, real_radii=radii)
             for p in parts]
    return (I.jackknife_from_values(full[0], [v[0] for v in leave], bounds=(0.0, 1.0)),
            I.jackknife_from_values(full[1], [v[1] for v in leave], bounds=(0.0, 1.0)))


def kid_interval(real, generated, groups: int = I.GROUPS) -> I.Interval:
    """The unbiased KID with its grouped-jackknife interval."""
    gen = as_features(generated, "generated features")
    real = as_features(real, "reference features")
    return I.jackknife(lambda idx: scores.kid(real, gen[idx]), gen.shape[0], groups)


def evaluate(metrics: Sequence[str], reference: Reference | None = None, *, features: str = "pool",
             arrays: Mapping[str, np.ndarray], fp_arrays: Mapping[str, np.ndarray] | None = None,
             groups: int = I.GROUPS,
             k: int = 3, is_splits: int = 10, is_split_size: int | None = None,
             ssim_window: int = 7) -> dict[str, I.Interval]:
    """``{metric: Interval}`` for ``metrics`` of the generated set in ``arrays``.

    ``arrays``: ``features`` (the main features, e.g. ``"pool"``), ``"spatial"`` (sFID),
    ``"logits"`` (IS), ``"predicted"`` and ``"labels"`` (agreement), ``"images"`` (uint8, the
    paired metrics against ``fp_arrays["images"]``; ``dfid`` against ``fp_arrays[features]``).
    Missing inputs raise a ValueError naming them.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")

    def need(key, metric):
        if key not in arrays:
            raise ValueError(f"metric {metric!r} needs the generated set's {key!r} (have {sorted(arrays)})")
        return arrays[key]

    def need_ref(metric):
        if reference is None:
            raise ValueError(f"metric {metric!r} needs reference statistics (--reference)")
        return reference

    out: dict[str, I.Interval] = {}
    for m in metrics:
        if m == "fid":
            out[m] = fid_interval(need(features, m), need_ref(m).stats_of(features), groups)
        elif m == "sfid":
            out[m] = fid_interval(need("spatial", m), need_ref(m).stats_of("spatial"), groups)
        elif m == "is":
            logits = need("logits", m)
            mean, std = scores.inception_score(logits, is_splits, is_split_size)
            splits = -(-len(logits) // is_split_size) if is_split_size else is_splits
            out[m] = I.split_interval(mean, std, splits)
        elif m in ("precision", "recall"):
            if "precision" not in out:
                out["precision"], out["recall"] = precision_recall_intervals(
                    need_ref(m).features_of(features), need(features, m), k, groups)
        elif m == "kid":
            out[m] = kid_interval(need_ref(m).features_of(features), need(features, m), groups)
        elif m == "agreement":
            hits = (np.asarray(need("predicted", m)) == np.asarray(need("labels", m))).astype(np.float64)
            out[m] = I.mean_interval(hits, groups, bounds=(0.0, 1.0))
        elif m in PAIRED:
            if fp_arrays is None:
                raise ValueError(f"metric {m!r} compares with the FP model's run: evaluate a quantized model")
            if m == "dfid":
                out[m] = fid_delta_interval(need(features, m), fp_arrays[features], need_ref(m).stats_of(features),
                                            groups)
                continue
            images, fp_images = need("images", m), fp_arrays["images"]
            if m == "psnr":
                mse = paired.mse_per_image(images, fp_images)
                full = paired.psnr_from_mse(float(mse.mean()))
                leave = [paired.psnr_from_mse(float(np.delete(mse, p).mean()))
                         for p in I.contiguous_groups(len(mse), groups)]
                out[m] = I.jackknife_from_values(full, leave)
            elif m == "ssim":
                out[m] = I.mean_interval(paired.ssim_per_image(images, fp_images, win_size=ssim_window), groups)
            else:
                out[m] = I.mean_interval(paired.mean_abs_diff_per_image(images, fp_images), groups)
    return {m: out[m] for m in metrics}
