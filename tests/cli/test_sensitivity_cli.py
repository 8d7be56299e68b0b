"""``jdq sensitivity`` on the embedded model with few samples and steps: JSON, chart, resume, bad input."""

import json

import pytest

from jdq import cli


def run(tmp_path, *extra):
    return cli.main(["sensitivity", "--out", str(tmp_path), "--samples", "2", "--steps", "2", *extra])


@pytest.mark.slow
def test_sensitivity_fast(tmp_path, capsys):
    argv = ("--recipe", "vidit-q", "--by", "layer", "--only", "blocks.0.mlp.fc1", "--weight-bits", "4",
            "--act-bits", "8", "--no-chart")
    assert run(tmp_path, *argv) == 0
    u = json.loads((tmp_path / "sensitivity.json").read_text())["units"]["blocks.0.mlp.fc1"]
    assert u["metric"] == "ssim" and u["group"] == "ffn" and u["weight_size"] == 160 * 640
    assert 0 < u["weight"]["4"]["sqnr"] < 80 and 0 < u["weight"]["4"]["ssim"] < 1 and set(u["act"]) == {"8"}
    capsys.readouterr()
    assert run(tmp_path, *argv) == 0  # resumed: nothing left to measure
    assert "0 new measurements" in capsys.readouterr().err


@pytest.mark.slow
def test_sensitivity_writes_json_and_chart_and_resumes(tmp_path, capsys):
    argv = ("--recipe", "mixdq", "--only", "blocks.0.mlp.*", "blocks.0.attn.qkv", "--weight-bits", "4",
            "--act-bits", "8")
    assert run(tmp_path, *argv) == 0
    units = json.loads((tmp_path / "sensitivity.json").read_text())["units"]
    assert set(units) == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.0.attn.qkv"}
    assert [units[n]["metric"] for n in sorted(units)] == ["sqnr", "ssim", "ssim"]
    assert units["blocks.0.mlp.fc1"]["weight_size"] == 160 * 640
    for u in units.values():
        assert 0 < u["weight"]["4"]["sqnr"] < 80 and 0 < u["weight"]["4"]["ssim"] < 1
        assert set(u["act"]) == {"8"}
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    capsys.readouterr()
    assert run(tmp_path, *argv, "--no-chart") == 0  # resumed: nothing left to measure
    assert "0 new measurements" in capsys.readouterr().err


@pytest.mark.slow
def test_group_sweep_ranks_bit_widths(tmp_path):
    argv = ("--recipe", "vidit-q", "--only", "blocks.0*", "--weight-bits", "2", "8", "--act-bits", "8")
    assert run(tmp_path, *argv) == 0
    data = json.loads((tmp_path / "sensitivity.json").read_text())
    units = data["units"]
    assert set(units) == {"blocks.0/adaln", "blocks.0/attention", "blocks.0/ffn"}
    ffn, attn = units["blocks.0/ffn"], units["blocks.0/attention"]
    assert ffn["metric"] == "ssim" and attn["metric"] == "sqnr"  # MixDQ's decoupling: FFN is a content group
    assert ffn["sites"] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert ffn["weight_size"] == 2 * 160 * 640
    for u in units.values():  # 2-bit weights are far worse than 8-bit ones, on both metrics
        assert u["weight"]["8"]["sqnr"] > u["weight"]["2"]["sqnr"] + 10
        assert u["weight"]["8"]["ssim"] > u["weight"]["2"]["ssim"]
        assert set(u["act"]) == {"8"}


def test_sensitivity_refuses_other_settings_and_bad_input(tmp_path, capsys):
    (tmp_path / "sensitivity.json").write_text(json.dumps({"settings": {"recipe": "mixdq"}, "units": {}}))
    assert run(tmp_path, "--recipe", "vidit-q", "--only", "blocks.0*") == 2
    assert "other settings" in capsys.readouterr().err
    assert json.loads((tmp_path / "sensitivity.json").read_text())["settings"] == {"recipe": "mixdq"}  # kept
    assert run(tmp_path / "new", "--recipe", "mixdq", "--only", "nothing*") == 2
    assert "matches no unit" in capsys.readouterr().err
    assert run(tmp_path / "new", "--recipe", "mixdq", "--weight-bits", "9") == 2
    assert "bit widths" in capsys.readouterr().err
