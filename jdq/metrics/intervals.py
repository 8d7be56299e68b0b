"""Confidence intervals for sample-set metrics: the delete-a-group jackknife.

Every metric of a set of ``N`` generated samples (FID, KID, precision, recall, agreement, PSNR,
SSIM, mean |Δ|) gets a 95 % interval from the **grouped (delete-a-group) jackknife**: the samples
are cut into ``G`` contiguous groups (default 10; the protocols order the class labels so that
every group holds the same classes), the metric is recomputed ``G`` times with one group left
out, and

    se² = (G − 1)/G · Σ_g (θ_(g) − θ̄)²,   interval = θ̂ ± t_{0.975, G−1} · se,

``θ̂`` the metric on all samples, ``θ_(g)`` without group ``g``, ``θ̄`` their mean; ``t`` is
Student's quantile with ``G − 1`` degrees of freedom (2.262 for ``G = 10``).

Why this and not a bootstrap: FID is a smooth function of the sample mean and covariance, so
the jackknife variance is consistent for it (Shao & Tu, *The Jackknife and Bootstrap*, ch. 2),
and each leave-one-group-out subset has ``N(1 − 1/G)`` distinct samples — the same regime as
the full set. A bootstrap resample *with replacement* holds only ~63 % distinct samples; the
duplicates shrink the covariance's spread and add a bias that moves FID (upwards), so bootstrap
FIDs are centred away from the FID being reported and their spread is not its spread. For
non-smooth statistics such as precision and recall (k-NN coverage), deleting groups of ``N/G``
samples (``d/√N → ∞``) keeps the delete-d jackknife consistent (Shao & Wu, Ann. Stat. 1989),
where the delete-1 jackknife is not. For plain means (agreement, SSIM, mean |Δ|) the grouped
jackknife is the batch-means standard error.

What the interval covers: the expected value of the metric *at this sample size* for this
model, sampler and protocol (FID depends on ``N``; compare FIDs at equal ``N``). The reference
statistics are treated as fixed: they are shared by every model being compared.
:func:`jackknife` also returns the jackknife bias estimate ``(G − 1)(θ̄ − θ̂)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

#: Default number of jackknife groups.
GROUPS = 10
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A metric value with a confidence interval: ``value``, ``low``, ``high``, ``se``, ``method``."""

    value: float
    low: float
    high: float
    se: float
    method: str
    level: float = LEVEL
    bias: float | None = None

    def to_dict(self) -> dict:
        """JSON-able dict (``inf``/``nan`` as strings)."""
        def enc(v):
            if v is None:
                return None
            v = float(v)
            return v if math.isfinite(v) else str(v)
        return {"value": enc(self.value), "low": enc(self.low), "high": enc(self.high), "se": enc(self.se),
                "level": self.level, "method": self.method, **({"bias": enc(self.bias)} if self.bias is not None else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Interval":
        """The interval written by :meth:`to_dict`."""
        num = ("value", "low", "high", "se", "bias")
        return cls(**{k: (float(v) if k in num and v is not None else v) for k, v in d.items()})

    def format(self, digits: int = 2, percent: bool = False) -> str:
        """``"12.34 [11.02, 13.66]"`` (``percent``: values ×100 with a ``%``)."""
        k, unit = (100.0, "%") if percent else (1.0, "")
        if not math.isfinite(self.value):
            return f"{self.value * k}{unit}"
        return f"{self.value * k:.{digits}f}{unit} [{self.low * k:.{digits}f}, {self.high * k:.{digits}f}]"


def t_quantile(level: float, dof: int) -> float:
    """Student's t quantile ``(1 + level)/2`` with ``dof`` degrees of freedom."""
    from scipy.special import stdtrit  # scipy.special: not the seconds-long import of scipy.stats

    return float(stdtrit(dof, 0.5 + level / 2.0))


def contiguous_groups(n: int, groups: int = GROUPS) -> list[np.ndarray]:
    """``groups`` contiguous index blocks covering ``0..n-1`` (sizes differ by at most one)."""
    if not 2 <= groups <= n:
        raise ValueError(f"a jackknife needs 2..{n} groups for {n} samples, got {groups}")
    edges = [g * n // groups for g in range(groups + 1)]
    return [np.arange(edges[g], edges[g + 1]) for g in range(groups)]


def jackknife_from_values(full: float, leave_out: Sequence[float], level: float = LEVEL,
                          bounds: tuple[float, float] | None = None, method: str | None = None) -> Interval:
    """The interval from ``full`` (the metric on all samples) and its leave-one-group-out values."""
    v = np.asarray(leave_out, np.float64)
    g = v.shape[0]
    if g < 2:
        raise ValueError("a jackknife needs at least 2 groups")
    if not (math.isfinite(full) and np.all(np.isfinite(v))):
        return Interval(float(full), float("nan"), float("nan"), float("nan"),
                        method or f"grouped jackknife ({g} groups)", level)
    mean = float(v.mean())
    se = math.sqrt((g - 1) / g * float(np.sum((v - mean) ** 2)))
    half = t_quantile(level, g - 1) * se
    low, high = full - half, full + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(float(full), low, high, se, method or f"grouped jackknife ({g} contiguous groups, t_{g - 1})",
                    level, bias=(g - 1) * (mean - full))


def jackknife(statistic: Callable[[np.ndarray], float], n: int, groups: int = GROUPS, level: float = LEVEL,
              bounds: tuple[float, float] | None = None) -> Interval:
    """Grouped jackknife of ``statistic(indices)`` over ``n`` samples in ``groups`` contiguous groups."""
    parts = contiguous_groups(n, groups)
    full = float(statistic(np.arange(n)))
    everything = np.arange(n)
    leave = [float(statistic(np.setdiff1d(everything, p, assume_unique=True))) for p in parts]
    return jackknife_from_values(full, leave, level, bounds)


def mean_interval(values, groups: int = GROUPS, level: float = LEVEL,
                  bounds: tuple[float, float] | None = None) -> Interval:
    """Grouped-jackknife interval of the mean of per-sample ``values`` ``[N]``."""
    v = np.asarray(values, np.float64)
    return jackknife(lambda idx: float(v[idx].mean()), v.shape[0], groups, level, bounds)


def split_interval(scores_mean: float, scores_std: float, splits: int, level: float = LEVEL) -> Interval:
    """Interval of a mean over ``splits`` disjoint splits (IS): ``mean ± t · std / sqrt(splits − 1)`` (std: ddof 0)."""
    if splits < 2:
        return Interval(scores_mean, float("nan"), float("nan"), float("nan"), "one split: no interval", level)
    se = scores_std / math.sqrt(splits - 1)
    half = t_quantile(level, splits - 1) * se
    return Interval(scores_mean, scores_mean - half, scores_mean + half, se,
                    f"mean over {splits} disjoint in-order splits ± t_{splits - 1}·std/√{splits - 1}", level)
