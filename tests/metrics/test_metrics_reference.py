"""jdq.metrics against torch-fidelity, pytorch-fid and scikit-image on the same inputs."""

import warnings

import numpy as np
import pytest

from jdq import metrics as M
from metric_references import pytorch_fid_frechet_distance, torch_fidelity


def _sets(width, n_a=300, n_b=250, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((width, width)) / np.sqrt(width)
    a = rng.standard_normal((n_a, width)) @ mix + 0.5
    b = rng.standard_normal((n_b, width)) @ (mix + 0.1 * np.eye(width)) + 0.3
    return a, b


@pytest.mark.parametrize("width", [1, 7, 64])
def test_fid_equals_torch_fidelity_and_pytorch_fid(width):
    torch = pytest.importorskip("torch")
    tf_fid = torch_fidelity("metric_fid")["metric_fid"]
    a, b = _sets(width)
    ours = M.fid(a, b)
    stats = [tf_fid.fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)]
    for st in stats:  # np.cov of one feature is 0-d; both references expect [d, d]
        st["sigma"] = np.atleast_2d(st["sigma"])
    ref_tf = tf_fid.fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    ref_pf = pytorch_fid_frechet_distance()(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"], stats[1]["sigma"])
    # the same float64 formula on the same statistics: agreement to rounding (~1e-12); the bound is 1e-6
    assert ours == pytest.approx(ref_tf, rel=1e-6) and ours == pytest.approx(ref_pf, rel=1e-6)
    assert ours > 0.0


def test_fid_rank_deficient_warns_and_still_matches():
    torch = pytest.importorskip("torch")
    tf_fid = torch_fidelity("metric_fid")["metric_fid"]
    a, b = _sets(32, n_a=20, n_b=200, seed=1)
    with pytest.warns(M.RankDeficientWarning, match="20 samples for 32-dimensional"):
        ours = M.fid(a, b)
    stats = [tf_fid.fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)]
    ref = tf_fid.fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert ours == pytest.approx(ref, rel=1e-6)


def test_streamed_statistics_equal_numpy():
    a, _ = _sets(16, n_a=1003)
    s = M.GaussianStats.empty(16)
    for i in range(0, len(a), 97):
        s = s.update(a[i:i + 97])
    assert s.n == 1003
    np.testing.assert_allclose(s.mu, a.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s.sigma, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-13)


def test_inception_score_equals_torch_fidelity_unshuffled():
    torch = pytest.importorskip("torch")
    isc = torch_fidelity("metric_isc")["metric_isc"]
    logits = np.random.default_rng(2).standard_normal((503, 1008)) * 3
    ref = isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    mean, std = M.inception_score(logits, splits=10)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-8)


def test_inception_score_split_size_is_adm_chunks():
    logits = np.random.default_rng(3).standard_normal((230, 20)) * 2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []  # the ADM evaluator's loop, written out
    for i in range(0, 230, 100):
        part = p[i:i + 100]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    mean, _ = M.inception_score(logits, split_size=100)
    assert mean == pytest.approx(float(np.mean(scores)), rel=1e-10)


def test_precision_recall_equal_torch_fidelity():
    torch = pytest.importorskip("torch")
    prc = torch_fidelity("metric_prc")["metric_prc"]
    real, gen = _sets(10, n_a=400, n_b=300, seed=4)
    ref = prc.calculate_precision_recall_full(torch.from_numpy(gen), torch.from_numpy(real), 3, 10000)
    ours = M.precision_recall(real, gen, k=3, block=128)  # blocks smaller than the sets: the blocked path
    # precision and recall are counts over the sets (torch's mean is float32): the same counts unless a
    # distance ties a radius within rounding
    assert round(ours[0] * 300) == round(ref[0] * 300) and round(ours[1] * 400) == round(ref[1] * 400)
    assert 0.2 < ours[0] < 1.0 and 0.2 < ours[1] < 1.0


def test_kid_equals_torch_fidelity():
    torch = pytest.importorskip("torch")
    kidm = torch_fidelity("metric_kid")["metric_kid"]
    real, gen = _sets(12, n_a=120, n_b=150, seed=5)
    kw = dict(kid_subsets=5, kid_subset_size=100, verbose=False, rng_seed=7, kid_kernel="poly",
              kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    ref = kidm.kid_features_to_metric(torch.from_numpy(gen), torch.from_numpy(real), **kw)
    mean, std = M.kid_subsets(real, gen, subsets=5, subset_size=100, seed=7)
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
    assert std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-7)


@pytest.mark.parametrize("win, channels", [(7, 1), (3, 3), (27, 1)])
def test_ssim_and_psnr_equal_scikit_image(win, channels):
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(win)
    a = rng.integers(0, 256, (3, 28, 28, channels), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    ours = M.ssim_per_image(a, b, win_size=win)
    ref = [skm.structural_similarity(a[i], b[i], win_size=win, data_range=255, channel_axis=-1) for i in range(3)]
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)  # float64 both; window sums exact on integers
    assert M.psnr(a, b) == pytest.approx(skm.peak_signal_noise_ratio(a, b, data_range=255), rel=1e-12)
    assert M.psnr(a, a) == np.inf and M.mean_abs_diff(a, a) == 0.0


def test_bad_inputs_are_named():
    a, b = _sets(4)
    with pytest.raises(ValueError, match="feature widths differ: first set has 4, second set has 3"):
        M.fid(a, b[:, :3])
    bad = a.copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="1 of 300 rows contain NaN or Inf"):
        M.fid(bad, b)
    with pytest.raises(ValueError, match="2-D"):
        M.fid(a[0], b)
    with pytest.raises(ValueError, match="data_range is required"):
        M.ssim(np.zeros((1, 8, 8, 1), np.float32), np.zeros((1, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="win_size 9 exceeds"):
        M.ssim(np.zeros((1, 8, 8, 1), np.uint8), np.zeros((1, 8, 8, 1), np.uint8), win_size=9)
    with pytest.raises(ValueError, match="same shape"):
        M.psnr(np.zeros((1, 8, 8, 1), np.uint8), np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="k must lie"):
        M.precision_recall(a[:3], b, k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full-rank set does not warn
        M.fid(a, b)
