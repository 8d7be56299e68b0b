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


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    """A tiny random class-conditional DiT saved as a jdq model folder (2 blocks, 8x8 images)."""
    import jdq
    from jdq.models import dit

    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    folder = tmp_path_factory.mktemp("tiny") / "dit"
    jdq.models.save(dit.from_config(cfg, key=1), folder)
    return str(folder)


@pytest.mark.parametrize("vary, extra, message", [
    (["bits.blocks.9.attn.qkv=4,8"], [], "no linear layer 'blocks.9.attn.qkv'"),
    (["bits[blocks.*.nope]=4,8"], [], "matches no linear layer"),
    (["timegroup_bits=8-4-4-8"], ["--steps", "3"], "pattern of 4 time groups needs 1..3 groups for 3 steps"),
    (["timegroup_bits=8-x"], [], "is not a pattern of bit widths"),
    (["bits.blocks.0.attn.qkv=4,5"], ["--bits-family", "mx"], "bit width 5 is not allowed in the 'mx' family"),
    (["timegroup_bits=8-9"], [], "bit width 9 is not allowed in the 'int' family"),
    (["bits[blocks.0.*]=4,8", "bits.blocks.0.mlp.fc1=8"], [], "is set by both"),
    (["bits.blocks.0.attn.qkv=4,8"], ["--recipe", "mixdit"], "do not combine them with --recipe"),
    (["ratio=0.1"], ["--recipe", "mixdit", "--bits-family", "mx"], "apply to bits.* / timegroup_bits settings only"),
])
def test_bit_width_settings_name_the_problem(tiny_dit, tmp_path, capsys, vary, extra, message):
    out = tmp_path / "run"
    argv = ["sweep", tiny_dit, *[a for v in vary for a in ("--vary", v)], "--samples", "2", "--steps", "4",
            "--metrics", "psnr", *extra, "--out", str(out)]
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and message in err and not out.exists(), err


@pytest.mark.slow
def test_bit_width_sweep_vmaps_layers_and_patterns_and_compiles_pattern_lengths_apart(tiny_dit, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sweep", tiny_dit, "--vary", "bits.blocks.0.attn.qkv=2,8", "--vary", "bits[blocks.1.mlp.*]=4,8",
            "--vary", "timegroup_bits=8-2-8,8-8-8,4-8", "--samples", "2", "--steps", "3", "--metrics", "psnr,ssim",
            "--hardware", "h100", "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads((out / "sweep.json").read_text())
    s = payload["structure"]
    assert s["compilations"] == 2  # 3-group and 2-group patterns are different plans
    assert set(s["vmapped"]) == {"bits.blocks.0.attn.qkv", "bits[blocks.1.mlp.*]", "timegroup_bits"}
    assert s["structural"] == ["timegroup_bits"]
    assert sorted(g["points"] for g in s["groups"]) == [4, 8]
    rows = {r["label"]: r for r in payload["points"]}
    assert len(rows) == 12
    hi = rows["bits.blocks.0.attn.qkv=8 bits[blocks.1.mlp.*]=8 timegroup_bits=8-8-8"]
    lo = rows["bits.blocks.0.attn.qkv=2 bits[blocks.1.mlp.*]=4 timegroup_bits=8-2-8"]
    # fewer bits are no slower on the roofline, and the 2-bit point is further from FP than the all-8-bit one
    assert lo["cost"]["h100"]["seconds"] <= hi["cost"]["h100"]["seconds"]
    assert lo["metrics"]["psnr"]["value"] < hi["metrics"]["psnr"]["value"]
    md = (out / "sweep.md").read_text()
    assert "structural (compiled separately): ['timegroup_bits']" in md
    assert payload["settings"]["bits_family"] == "int" and payload["settings"]["bits_default"] == 8
