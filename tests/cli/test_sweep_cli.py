"""``jdq sweep`` (jdq.cli.sweep): argument errors, and a tiny resumable sweep of the embedded model."""

import json

import numpy as np
import pytest

from jdq.cli import main


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "mixdit"], "nothing to sweep"),
    (["--recipe", "mixdit", "--vary", "bits=4,8"], "unknown setting 'bits'"),
    (["--recipe", "mixdit", "--vary", "ratio=0.1,1.5"], "must lie in [0, 1]"),
    (["--vary", "ratio=0.1"], "no recipe"),
    (["--recipe", "nope", "--vary", "ratio=0.1"], "unknown recipe 'nope'"),
    (["--recipe", "mixdit", "--vary", "ratio=0.1", "--metrics", "fid9"], "unknown metric(s) ['fid9']"),
    (["--recipe", "mixdit", "--vary", "ratio=0.1", "--hardware", "tpu9"], "unknown hardware preset(s) ['tpu9']"),
    (["--recipe", "mixdit", "--vary", "ratio=0.1", "--cost-model", "dit-xl-9"], "unknown --cost-model"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    status = main(["sweep", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and message in err and not out.exists()


def test_setting_that_changes_nothing_is_an_error(tmp_path, capsys):
    status = main(["sweep", "--recipe", "w8a8", "--vary", "ratio=0.1,0.2", "--out", str(tmp_path / "r"),
                   "--samples", "2", "--steps", "1"])
    assert status == 2 and "changes nothing in recipe 'w8a8'" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_sweep_resumes_per_chunk(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sweep", "--recipe", "mixdit", "--vary", "ratio=0,0.5", "--samples", "4", "--steps", "2",
            "--max-chunk", "1", "--hardware", "mixdit_like,h100", "--out", str(out)]
    assert main(argv) == 0
    first = json.loads((out / "sweep.json").read_text())
    assert first["structure"]["compilations"] == 1 and first["structure"]["vmapped"] == ["ratio"]
    assert [r["label"] for r in first["points"]] == ["ratio=0.0", "ratio=0.5"]
    for r in first["points"]:
        assert set(r["metrics"]) == {"animal-fid", "dfid", "psnr", "ssim"} and set(r["cost"]) == {"mixdit_like", "h100"}
        fid = r["metrics"]["animal-fid"]
        assert fid["low"] <= fid["value"] <= fid["high"]
    # more MX9 outliers cost more on the accelerator (MX9 is wider than MX6)
    assert first["points"][1]["cost"]["mixdit_like"]["seconds"] > first["points"][0]["cost"]["mixdit_like"]["seconds"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "| ratio=0.5 |" in (out / "sweep.md").read_text()
    # resume: drop the second chunk; the rerun samples only it and reproduces the first run's samples
    kept = np.load(out / "points" / "g00-c0000.npz")["samples"]
    dropped = np.load(out / "points" / "g00-c0001.npz")["samples"]
    (out / "points" / "g00-c0001.npz").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "1 chunk(s) to sample" in err and "sampling FP" not in err
    np.testing.assert_array_equal(np.load(out / "points" / "g00-c0000.npz")["samples"], kept)  # not rewritten
    again = np.load(out / "points" / "g00-c0001.npz")["samples"]
    assert np.max(np.abs(again - dropped)) == 0.0  # the same compiled program on the same inputs: deterministic
    # another grid in the same folder is refused
    assert main(argv[:4] + ["ratio=0,0.25"] + argv[5:]) == 2
    assert "other settings" in capsys.readouterr().err
