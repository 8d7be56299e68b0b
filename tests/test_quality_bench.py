"""benchmarks/quality.py: its tables from ``jdq eval`` results, resuming from finished runs, notes kept."""

import json

import pytest


@pytest.fixture(scope="module")
def qb(load_benchmark):
    return load_benchmark("quality")


def _results(fid, samples=1000, quant=True):
    iv = lambda v, lo, hi: {"value": v, "low": lo, "high": hi, "se": (hi - lo) / 4, "level": 0.95,  # noqa: E731
                            "method": "grouped jackknife (10 contiguous groups, t_9)"}
    m = {"fid": iv(fid, fid - 1, fid + 1), "precision": iv(0.8, 0.75, 0.85), "recall": iv(0.5, 0.45, 0.55),
         "agreement": iv(0.9, 0.88, 0.92)}
    if quant:
        m |= {"dfid": iv(5.0, 4.0, 6.0), "psnr": iv(20.0, 19.5, 20.5), "ssim": iv(0.8, 0.79, 0.81), "mad": iv(10.0, 9.5, 10.5)}
    return {"metrics": m, "settings": {"samples": samples}, "timing": {"total_s": 12.0}}


def test_table_has_every_metric_with_its_interval(qb):
    text = qb.table([("FP (float32)", _results(30.0, quant=False)), ("`mx6`", _results(35.5))])
    assert "| FP (float32) | 1000 | 30.00 [29.00, 31.00] | — | 80.0% [75.0, 85.0] |" in text
    assert "90.0% [88.0, 92.0] | — | — | — | 12 |" in text  # the FP row has no paired metrics
    assert "| `mx6` | 1000 | 35.50 [34.50, 36.50] | 5.00 [4.00, 6.00] |" in text
    assert "20.00 [19.50, 20.50] | 0.8000 [0.7900, 0.8100] | 10.00 [9.50, 10.50]" in text


def test_sweep_table_marks_the_lowest_fid(qb):
    text = qb.sweep_table([(1.0, _results(40.0, quant=False)), (1.5, _results(25.0, quant=False)),
                           (4.0, _results(80.0, quant=False))])
    assert "| 1.5 (lowest) |" in text and "| 4 |" in text


def test_finished_runs_are_read_back_not_rerun(qb, tmp_path):
    run = tmp_path / "fp"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_results(33.0, quant=False)))
    assert qb.eval_run(run, samples=10)["metrics"]["fid"]["value"] == 33.0  # no jdq eval call: no model run


def test_notes_are_kept_and_unknown_recipes_named(qb, tmp_path):
    out = tmp_path / "q.md"
    qb.atomic_write_text(out, "table\n" + qb.NOTES_MARKER + "\n\nhand-written\n")
    assert qb.kept_notes(out) == "hand-written\n"
    with pytest.raises(SystemExit, match="unknown recipe 'nope'"):
        qb.main(["--recipes", "nope", "--runs", str(tmp_path / "runs"), "--out", str(out)])


def test_rows_with_options_and_their_calibration_table(qb):
    assert qb.parse_row("tq-dit:wbits=6,abits=6,search=null,fitness=output-mse") == (
        "tq-dit", {"wbits": 6, "abits": 6, "search": None, "fitness": "output-mse"})
    assert qb.parse_row("w8a8") == ("w8a8", {})
    assert qb.row_slug("q-dit:search=true,population=8") == "q-dit-searchtrue-population8"
    r = dict(_results(31.0), quantize_report={"calibration_s": 12.4, "prepare_s": 3.0, "total_s": 16.0,
                                              "peak_rss_mib": 900.0, "quantized_weight_bytes": 2048})
    text = qb.calibration_table([("`tq-dit`", r), ("`w8a8`", _results(30.0))])
    assert "| `tq-dit` | 12 | 3 | 900 | 2 |" in text and "w8a8" not in text
    assert qb.calibration_table([("`w8a8`", _results(30.0))]) == ""
