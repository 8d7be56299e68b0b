"""benchmarks/quality.py at a toy size: the FP row reproduces the reference, a quantized row differs."""

import math

import numpy as np
import pytest

@pytest.fixture(scope="module")
def qb(load_benchmark):
    return load_benchmark("quality")


def test_metrics_on_known_offsets(qb):
    ref = np.zeros((3, 4, 4, 1), np.float32)
    # +0.2 in [-1, 1] is +0.1 in [0, 1]: MSE 0.01 -> 20 dB, |Δ| 0.1 * 255 levels
    assert qb.psnr(ref + 0.2, ref) == pytest.approx(20.0)
    assert qb.mean_abs_diff(ref + 0.2, ref) == pytest.approx(25.5)
    assert math.isinf(qb.psnr(ref, ref)) and qb.mean_abs_diff(ref, ref) == 0.0
    # values outside [-1, 1] are clipped like the images: 1.5 vs 1.0 is no difference
    assert qb.mean_abs_diff(ref + 1.5, ref + 1.0) == 0.0


def test_fp_row_reproduces_reference_and_w8a8_differs(qb, tmp_path):
    rows, info = qb.run(["fp", "w8a8"], steps=2, per_class=2, reduced={"w8a8": 1}, batch_size=10,
                        log=lambda s: None)
    fp, w8 = rows
    assert (fp["n"], w8["n"]) == (20, 10)  # the reduced row keeps one seed per class
    assert math.isinf(fp["psnr"]) and fp["mad"] == 0.0 and fp["same_label"] == 1.0
    assert math.isfinite(w8["psnr"]) and w8["mad"] > 0.0
    for r in rows:
        assert 0.0 <= r["agreement"] <= 1.0
        assert r["agreement_se"] == pytest.approx(math.sqrt(r["agreement"] * (1 - r["agreement"]) / r["n"]))
    assert (info["sampler"], info["steps"], info["guidance"]) == ("ddpm", 2, 4.0)

    text = qb.report(rows, info, "cmd", 1.0, (0.0,) * 3, (0.0,) * 3)
    assert "| FP (float32) | 20 |" in text and "| `w8a8` | 10 |" in text and "| ∞ |" in text
    out = tmp_path / "q.md"
    qb.atomic_write_text(out, text + "\n" + qb.NOTES_MARKER + "\n\nhand-written\n")
    assert qb.kept_notes(out) == "hand-written\n"


def test_unknown_recipe_and_bad_reduction_are_named(qb):
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        qb.run(["fp", "nope"], steps=1, per_class=1, log=lambda s: None)
    with pytest.raises(ValueError, match="w8a8=3"):
        qb.run(["w8a8"], steps=1, per_class=2, reduced={"w8a8": 3}, log=lambda s: None)
