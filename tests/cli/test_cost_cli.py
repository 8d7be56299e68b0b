"""``jdq cost`` (jdq.cli.cost): arguments, the table, the JSON file."""

import argparse
import json

import pytest

from jdq.cli import cost as cli


def _parse(*argv):
    parser = argparse.ArgumentParser(prog="jdq")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(sub)
    return parser.parse_args(["cost", *argv])


def test_cost_dit_speedup_and_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    status = cli.run(_parse("--models", "dit-xl-2", "--steps", "10", "--json", str(out)))
    assert status == 0
    text = capsys.readouterr().out
    assert "dit-xl-2" in text and "2.10-5.32x" in text and "assumptions" in text
    payload = json.loads(out.read_text())
    row = payload["rows"][0]
    assert row["model"] == "dit-xl-2" and row["steps"] == 10
    assert row["total_s"] == pytest.approx(row["step_ms"] * 10 / 1e3)
    assert row["speedup"] == pytest.approx(row["baseline_step_ms"] / row["step_ms"])
    assert row["gmacs_per_step"] == pytest.approx(2 * 118.6, rel=0.005)  # batch 2 (CFG)
    assert payload["mixdit_reported"] == [2.10, 5.32]


def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "cost.json"
    status = cli.run(_parse("--models", "dit-xl-9", "--hw", "tpu9", "--plan", "w1a1", "--json", str(out)))
    err = capsys.readouterr().err
    assert status == 2 and not out.exists()
    assert "unknown model(s) ['dit-xl-9']" in err and "'tpu9' is not a preset" in err and "'w1a1' is not a plan" in err


def test_bad_json_path_is_refused_before_costing(tmp_path, capsys):
    missing = tmp_path / "no" / "cost.json"
    assert cli.run(_parse("--models", "dit-xl-2", "--json", str(missing))) == 2
    captured = capsys.readouterr()
    assert f"folder {missing.parent} does not exist" in captured.err and captured.out == ""
    assert cli.run(_parse("--models", "dit-xl-2", "--json", str(tmp_path))) == 2
    assert "is a folder" in capsys.readouterr().err
