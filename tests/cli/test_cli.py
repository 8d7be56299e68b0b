"""The ``jdq`` command line: sampling end to end on tiny models, and every error path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jdq import cli
from jdq.models import base, dit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    """A tiny random class-conditional pixel-space DiT folder with sampling defaults."""
    d = tmp_path_factory.mktemp("models") / "tiny_dit"
    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    base.save(dit.from_config(cfg, key=0), d)
    (d / "sampling.json").write_text(json.dumps({"sampler": "ddim", "steps": 3, "guidance": 2.0,
                                                 "clip_denoised": True, "pixel_space": True,
                                                 "class_names": ["a", "b", "c"]}))
    return d


@pytest.fixture(scope="module")
def no_blocks_dir(tmp_path_factory):
    """A DiT with no transformer blocks: no recipe has anything to quantize in it."""
    d = tmp_path_factory.mktemp("models") / "no_blocks"
    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=0, num_heads=2, num_classes=3)
    base.save(dit.from_config(cfg, key=0), d)
    return d


def _run(args, capsys):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_writes_grid_and_npz(dit_dir, tmp_path, capsys):
    prefix = tmp_path / "s"
    code, out, err = _run(["sample", dit_dir, "--classes", 0, 2, "--per-class", 2, "--out", prefix, "--no-progress"],
                          capsys)
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as z:
        assert z["samples"].shape == (4, 8, 8, 1)
        np.testing.assert_array_equal(z["labels"], [0, 2, 0, 2])  # one column per class, one row per repetition
        settings = json.loads(str(z["settings"]))
        assert settings["sampler"] == "ddim" and settings["steps"] == 3 and settings["guidance"] == 2.0
        images = z["images"]
    assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 1)
    from PIL import Image

    png = np.asarray(Image.open(tmp_path / "s.png"))
    assert png.shape == (4 * (2 * 10 + 2), 4 * (2 * 10 + 2))  # 2×2 grid of 8×8 with 2-pixel padding, ×4
    assert "wrote" in out


@pytest.mark.slow
def test_same_seed_same_samples_and_quant_changes_them(dit_dir, tmp_path, capsys):
    runs = {}
    for name, extra in (("a", []), ("b", []), ("q", ["--quant", "mxfp4_e2m1"]), ("s", ["--quant", "w8a8-static"])):
        code, _, err = _run(["sample", dit_dir, "--out", tmp_path / name, "--no-progress", "--seed", 3, *extra], capsys)
        assert code == 0, err
        with np.load(tmp_path / f"{name}.npz") as z:
            runs[name] = z["samples"]
    np.testing.assert_array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["q"])
    assert np.abs(runs["a"] - runs["s"]).max() < 0.5  # int8 with calibrated static scales stays close


@pytest.mark.parametrize("args, message", [
    (["sample", "/no/such/model"], "model folder /no/such/model does not exist"),
    (["sample", "{dit}", "--sampler", "heun"], "unknown sampler 'heun'"),
    (["sample", "{dit}", "--sampler", "euler"], "does not fit a dit model"),
    (["sample", "{dit}", "--quant", "mxfp5"], "unknown quantization recipe 'mxfp5'"),
    (["sample", "{noblocks}", "--quant", "w8a8"], "recipe 'w8a8' does not fit this model"),
    (["sample", "{dit}", "--classes", "7"], "class 7 is out of range"),
    (["sample", "{dit}", "--out", "/no/such/folder/x"], "output folder /no/such/folder does not exist"),
    (["sample", "{dit}", "--steps", "0"], "--steps must be >= 1"),
    (["sample", "{dit}", "--embeddings", "e.npy"], "a DiT takes --classes"),
    (["sample", "{dit}", "--devices", "99"], "--devices 99"),
    (["convert", "/no/such.pt", "{tmp}/out"], "source /no/such.pt does not exist"),
])
def test_errors_are_one_line_and_nonzero(args, message, dit_dir, no_blocks_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run that wrongly succeeds writes here, not into the repository
    args = [a.format(dit=dit_dir, noblocks=no_blocks_dir, tmp=tmp_path) for a in args]
    code, out, err = _run(args, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not list(tmp_path.glob("samples*"))


def test_failed_run_leaves_previous_outputs_intact(dit_dir, tmp_path, capsys):
    (tmp_path / "s.png").write_bytes(b"previous png")
    (tmp_path / "s.npz").write_bytes(b"previous npz")
    code, _, _ = _run(["sample", dit_dir, "--quant", "nope", "--out", tmp_path / "s"], capsys)
    assert code == 2
    code, _, _ = _run(["sample", no_blocks := dit_dir, "--classes", "9", "--out", tmp_path / "s"], capsys)
    assert code == 2
    assert (tmp_path / "s.png").read_bytes() == b"previous png"
    assert (tmp_path / "s.npz").read_bytes() == b"previous npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.png"]  # no temporary files left behind
    del no_blocks


def test_text_models_need_embeddings(tmp_path, capsys):
    from jdq.models import pixart

    cfg = pixart.Config(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12)
    d = tmp_path / "pixart"
    base.save(pixart.from_config(cfg, key=0), d)
    code, _, err = _run(["sample", d, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "needs --embeddings" in err
    np.save(tmp_path / "e.npy", np.zeros((2, 5, 12), np.float32))
    code, _, err = _run(["sample", d, "--embeddings", tmp_path / "e.npy", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "needs --negative-embeddings" in err
    np.save(tmp_path / "n.npy", np.zeros((1, 5, 12), np.float32))
    code, _, err = _run(["sample", d, "--embeddings", tmp_path / "e.npy", "--negative-embeddings", tmp_path / "n.npy",
                         "--steps", 2, "--out", tmp_path / "x", "--no-progress"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "x.npz") as z:
        assert z["samples"].shape == (2, 8, 8, 4)


def test_console_entry_point_in_a_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jdq.cli", "sample", str(tmp_path / "missing")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"jdq sample: error: model folder {tmp_path / 'missing'} does not exist"
    proc = subprocess.run([sys.executable, "-m", "jdq.cli", "cost", "--hw", "nope", "--models", "dit-xl-2-256"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "'nope' is not a preset" in proc.stderr
