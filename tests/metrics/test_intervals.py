"""The intervals are sound: the grouped jackknife covers the expected FID at the sample size ~95 % of the time.

Gaussian features with a known reference (N(0, I)): 300 independent generated sets of 200
samples; the target is the mean FID over the replicates (E[FID_200], up to a Monte-Carlo error of
sd/√300, small beside the intervals' half-width of ~2.3 sd). With 300 replicates a true 95 %
coverage lands in [0.91, 0.98] with probability > 0.99 (binomial), so the bounds below fail only
for an interval that is too narrow or too wide.
"""

import numpy as np
import pytest

from jdq import metrics as M
from jdq.metrics import intervals as I


def _replicates(reps=300, n=200, d=4, seed=0):
    rng = np.random.default_rng(seed)
    ref = M.GaussianStats.from_moments(np.zeros(d), np.eye(d), 10_000)
    scale = np.sqrt(np.linspace(0.5, 1.5, d))
    sets = [rng.standard_normal((n, d)) * scale + 0.2 for _ in range(reps)]
    return ref, sets


def test_fid_jackknife_covers_the_expected_fid():
    ref, sets = _replicates()
    ivs = [M.fid_interval(x, ref, groups=10) for x in sets]
    target = np.mean([iv.value for iv in ivs])
    covered = np.mean([iv.low <= target <= iv.high for iv in ivs])
    assert 0.91 <= covered <= 0.98, covered
    # the standard errors estimate the spread of FID over sets
    assert np.mean([iv.se for iv in ivs]) == pytest.approx(np.std([iv.value for iv in ivs]), rel=0.15)


def test_bootstrap_with_replacement_inflates_fid():
    """Why not a bootstrap: resampled sets (≈63 % distinct samples) move FID away from the value reported."""
    ref, sets = _replicates(reps=40)
    rng = np.random.default_rng(1)
    shift = []
    for x in sets:
        full = M.fid_from_stats(M.GaussianStats.of(x), ref)
        boots = [M.fid_from_stats(M.GaussianStats.of(x[rng.integers(0, len(x), len(x))]), ref) for _ in range(50)]
        shift.append(np.mean(boots) - full)
    jack_se = np.mean([M.fid_interval(x, ref).se for x in sets])
    # the bootstrap mean sits above the estimate by a sizeable part of its standard error, on every set
    assert np.mean(shift) > 0.2 * jack_se and np.mean(np.asarray(shift) > 0) > 0.9


def test_jackknife_of_a_mean_is_the_batch_means_standard_error():
    v = np.random.default_rng(2).standard_normal(100)
    iv = M.mean_interval(v, groups=10)
    means = v.reshape(10, 10).mean(1)
    se = np.std(means, ddof=1) / np.sqrt(10)  # batch means: sd of the 10 group means / sqrt(10)
    assert iv.value == pytest.approx(v.mean()) and iv.se == pytest.approx(se, rel=1e-12)
    assert iv.high - iv.value == pytest.approx(I.t_quantile(0.95, 9) * se, rel=1e-12)


def test_interval_round_trip_and_bounds():
    iv = I.jackknife_from_values(0.99, [0.98, 1.0, 0.99, 0.97], bounds=(0.0, 1.0))
    assert iv.high == 1.0 and iv.low < 0.99
    assert I.Interval.from_dict(iv.to_dict()) == iv
    nan = I.jackknife_from_values(float("inf"), [1.0, 2.0])
    assert nan.value == np.inf and np.isnan(nan.low) and I.Interval.from_dict(nan.to_dict()).value == np.inf
