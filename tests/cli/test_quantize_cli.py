"""``jdq quantize``: a quantized folder that ``jdq sample`` / ``jdq eval`` / ``jdq.recipes.load`` use unchanged."""

import dataclasses
import json

import numpy as np
import pytest

from jdq import cli, recipes
from jdq.models import base, dit
from jdq.recipes import saved
from jdq.sampling.generate import generate, resolve_sampler


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random DiT folder (two blocks)."""
    d = tmp_path_factory.mktemp("q") / "tiny_dit"
    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    base.save(dit.from_config(cfg, key=0), d)
    (d / "sampling.json").write_text(json.dumps({"sampler": "ddim", "steps": 3, "guidance": 2.0, "clip_denoised": True,
                                                 "pixel_space": True}))
    return d


@pytest.fixture(scope="module")
def tiny(model_dir):
    """The model folder and a ptq4dit folder quantized from it (about 40 s on two cores: compiling)."""
    d = model_dir
    out = d.parent / "ptq"
    code = cli.main(["quantize", str(d), "--recipe", "ptq4dit", "--option", "wbits=4", "--calib-samples", "4",
                     "--out", str(out), "--no-progress"])
    assert code == 0
    return d, out


@pytest.mark.slow
def test_folder_loads_to_the_in_memory_quantizer_bit_for_bit(tiny):
    d, out = tiny
    assert {"quantized.json", "state.safetensors", "params.safetensors", "calibration.safetensors", "report.md",
            "report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["operands"] and report["quantized_weight_bytes"] < report["bf16_weight_bytes"]
    model, _ = base.load(d)
    sampler = resolve_sampler(model, "ddim", 3, clip_denoised=True)
    labels = np.arange(4, dtype=np.int32) % 3
    mem = recipes.quantize(model, "ptq4dit", sampler=sampler, cond=labels, guidance=2.0, calib_samples=4, wbits=4)
    _, disk = recipes.load(out)
    kw = dict(sampler=sampler, guidance=2.0, batch_size=4, progress=False)
    a = generate(model, labels, quant=mem.quantizer, params=mem.params, **kw)
    b = generate(model, labels, quant=disk.quantizer, params=disk.params, **kw)
    np.testing.assert_array_equal(a, b)
    assert disk.info["options"]["wbits"] == 4


@pytest.mark.slow
def test_sample_and_eval_take_the_folder(tiny, tmp_path):
    _, out = tiny
    assert cli.main(["sample", str(out), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert (tmp_path / "s.png").is_file()
    assert cli.main(["sample", str(out), "--quant", "w8a8", "--out", str(tmp_path / "s2")]) == 2
    assert cli.main(["eval", str(out), "--quant", "w8a8", "--out", str(tmp_path / "e")]) == 2


@pytest.mark.slow
def test_another_model_a_stale_version_or_a_truncated_state_are_refused(tiny, tmp_path, monkeypatch):
    d, out = tiny
    other = dit.from_config(dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2,
                                       num_heads=2, num_classes=3), key=1)
    with pytest.raises(saved.SavedError, match="another model"):
        recipes.load(out, other)
    from jdq.recipes import core

    monkeypatch.setitem(core._REGISTRY, "ptq4dit", dataclasses.replace(core.get("ptq4dit"), version=99))
    with pytest.raises(saved.SavedError, match="version"):
        recipes.load(out)
    monkeypatch.undo()
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = (bad / "state.safetensors").read_bytes()
    (bad / "state.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(saved.SavedError, match="truncated"):
        recipes.load(bad)
    assert cli.main(["sample", str(bad), "--out", str(tmp_path / "x")]) == 2


def test_bad_arguments_name_the_problem(model_dir, tmp_path, capsys):
    d = model_dir
    assert cli.main(["quantize", str(d), "--recipe", "nope", "--out", str(tmp_path / "a")]) == 2
    assert "unknown quantization recipe" in capsys.readouterr().err
    assert cli.main(["quantize", str(d), "--recipe", "ptq4dit", "--option", "bits=4", "--out", str(tmp_path / "a")]) == 2
    assert "no option 'bits'" in capsys.readouterr().err
    assert cli.main(["quantize", str(d), "--recipe", "ptq4dit", "--list-options"]) == 0
    assert "wbits = 8" in capsys.readouterr().out
