"""``jdq eval``: the embedded model end to end, resuming a killed run, two processes, refusing a foreign folder.

The runs are small (40 samples, 4 DDIM steps) and run as separate ``python -m jdq.cli`` processes
(the same way a user runs them; two of them at once for ``jax.distributed``). "Exactly the
result of an uninterrupted run" is checked bit for bit: every shard array and every metric.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--samples", "40", "--steps", "4", "--batch-size", "10", "--shard-size", "10", "--no-progress"]


def _cmd(out, *extra):
    return [sys.executable, "-m", "jdq.cli", "eval", *RUN, "--out", str(out), *map(str, extra)]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu")


def _run(out, *extra, check=True):
    p = subprocess.run(_cmd(out, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _metrics(out):
    return json.loads((Path(out) / "results.json").read_text())["metrics"]


def _same_shards(a, b, count=4):
    for s in range(count):
        with np.load(Path(a) / f"shard-{s:05d}.npz") as x, np.load(Path(b) / f"shard-{s:05d}.npz") as y:
            assert sorted(x.files) == sorted(y.files)
            for k in x.files:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"shard {s}: {k}")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("eval") / "uninterrupted"
    _run(out)
    return out


@pytest.mark.slow
def test_results_of_the_embedded_model(reference_run):
    res = json.loads((reference_run / "results.json").read_text())
    assert list(res["metrics"]) == ["fid", "precision", "recall", "agreement"]
    for name, m in res["metrics"].items():
        assert m["low"] <= m["value"] <= m["high"], name
        assert "jackknife" in m["method"]
    s = res["settings"]
    assert (s["protocol"], s["samples"], s["steps"], s["sampler"], s["seed"]) == ("animal-mnist", 40, 4, "ddim", 0)
    assert res["versions"]["jax"] and res["device"]["processes"] == 1
    assert "fold_in(key(0), j)" in res["seeds"]
    md = (reference_run / "results.md").read_text()
    assert "| FID |" in md and "95 % interval" in md
    from PIL import Image

    assert Image.open(reference_run / "samples.png").size[0] > 28 * 10
    assert sorted(p.name for p in reference_run.glob("shard-*.npz")) == [f"shard-{s:05d}.npz" for s in range(4)]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "shard-00001.npz").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    left = sorted(p.name for p in out.glob("shard-*.npz"))
    assert "shard-00003.npz" not in left and not (out / "results.json").exists()  # it really stopped midway
    p = _run(out)
    assert f"({len(left)} shard(s) already done)" in p.stderr
    _same_shards(out, reference_run)
    assert _metrics(out) == _metrics(reference_run)


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(reference_run, tmp_path):
    out = tmp_path / "two"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_cmd(out, "--coordinator", f"localhost:{port}", "--num-processes", 2,
                                   "--process-id", i), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]  # process 0 gathers and writes the results
    res = json.loads((out / "results.json").read_text())
    assert res["device"]["processes"] == 2
    _same_shards(out, reference_run)
    assert res["metrics"] == _metrics(reference_run)


@pytest.mark.slow
def test_a_folder_with_other_settings_is_refused(reference_run):
    before = {p.name: p.read_bytes() for p in reference_run.glob("*.npz")}
    p = _run(reference_run, "--seed", 1, check=False)
    assert p.returncode == 2
    assert "other settings" in p.stderr and "seed: folder 0, this run 1" in p.stderr
    assert {p.name: p.read_bytes() for p in reference_run.glob("*.npz")} == before  # nothing lost or mixed


@pytest.mark.slow
def test_quantized_run_pairs_with_the_fp_run(reference_run, tmp_path):
    out = tmp_path / "w8a8"
    _run(out, "--quant", "w8a8", "--fp-run", reference_run)
    m = _metrics(out)
    assert list(m) == ["fid", "precision", "recall", "agreement", "dfid", "psnr", "ssim", "mad"]
    assert m["dfid"]["value"] == pytest.approx(m["fid"]["value"] - _metrics(reference_run)["fid"]["value"], rel=1e-9)
    assert "paired" in m["dfid"]["method"]
    assert 10 < m["psnr"]["value"] < 80 and 0 < m["mad"]["value"] < 50 and 0 < m["ssim"]["value"] < 1
    assert not (out / "fp").exists()  # the given FP run was used, not sampled again
