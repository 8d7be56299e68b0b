"""Sample-quality metrics: FID / sFID / IS / precision–recall / KID, paired fidelity (PSNR, SSIM, |Δ|), intervals.

Pure functions on arrays (float64 inside where it matters); feature extractors live with their
models (:mod:`jdq.models.inception`, the FID Inception-v3; the embedded model's classifier in
:mod:`jdq.demo.animal_fid`). :mod:`jdq.metrics.evaluate` computes every metric of a generated set
with its interval (:mod:`jdq.metrics.intervals`); :mod:`jdq.metrics.shards` runs a sharded,
resumable, multi-process evaluation (``jdq eval``); :mod:`jdq.metrics.reference` reads
reference batches (the ADM evaluator's ``.npz``).
"""

from jdq.metrics.evaluate import METRICS, Reference, evaluate, fid_interval, kid_interval, precision_recall_intervals
from jdq.metrics.fid import (
    GaussianStats,
    RankDeficientWarning,
    fid,
    fid_from_stats,
    frechet_distance,
    sfid,
)
from jdq.metrics.intervals import Interval, jackknife, mean_interval
from jdq.metrics.paired import mean_abs_diff, mean_abs_diff_per_image, psnr, ssim, ssim_per_image
from jdq.metrics.scores import inception_score, kid, kid_subsets, knn_radii, precision_recall

__all__ = [
    "METRICS", "GaussianStats", "Interval", "RankDeficientWarning", "Reference", "evaluate", "fid", "fid_from_stats",
    "fid_interval", "frechet_distance", "inception_score", "jackknife", "kid", "kid_interval", "kid_subsets",
    "knn_radii", "mean_abs_diff", "mean_abs_diff_per_image", "mean_interval", "precision_recall",
    "precision_recall_intervals", "psnr", "sfid", "ssim", "ssim_per_image",
]
