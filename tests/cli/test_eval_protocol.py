"""``jdq eval --protocol dit-imagenet256`` end to end on a tiny random DiT, a tiny Inception and a made-up ADM batch.

The real run (DiT-XL/2, 10,000 samples, the converted FID Inception, VIRTUAL_imagenet256_labeled.npz)
is a GPU job; here every piece of it runs: 10 samples per class of a 2-class pixel-space DiT, cfg
1.5, the Inception's pool / spatial / logits features (``input_size`` 75 to be fast), the
reference's images streamed through the same Inception and its statistics where present, and
FID / sFID / IS / precision / recall with intervals. Plus the bad inputs ``jdq eval`` must name.
"""

import json
import warnings

import numpy as np
import pytest

from jdq import cli
from jdq.models import base, dit, inception


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    cfg = dit.Config(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    base.save(dit.from_config(cfg, key=0), root / "dit")
    (root / "dit" / "sampling.json").write_text(json.dumps({"pixel_space": True, "clip_denoised": True}))
    base.save(inception.from_config(inception.Config(input_size=75), key=1), root / "inception")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    np.savez(root / "ref_images.npz", arr_0=images)
    d = 2048
    np.savez(root / "ref_stats_only.npz", mu=np.zeros(d), sigma=np.eye(d))
    np.savez(root / "ref_bad.npz", labels=np.arange(3))
    return root


def _eval(folders, out, *extra, capsys=None):
    args = ["eval", str(folders / "dit"), "--protocol", "dit-imagenet256", "--inception", str(folders / "inception"),
            "--steps", "3", "--batch-size", "10", "--groups", "4", "--out", str(out), "--no-progress",
            *map(str, extra)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 20 samples of 2048-wide features: rank-deficient, by design here
        return cli.main(args)


@pytest.mark.slow
def test_dit_imagenet256_protocol_end_to_end(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert _eval(folders, out, "--reference", folders / "ref_images.npz") == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    s = res["settings"]
    assert (s["samples"], s["guidance"], s["sampler"], s["protocol"]) == (20, 1.5, "ddpm", "dit-imagenet256")
    assert list(res["metrics"]) == ["fid", "sfid", "is", "precision", "recall"]
    for name in ("fid", "sfid", "precision", "recall"):
        m = res["metrics"][name]
        assert m["low"] <= m["value"] <= m["high"], name
    assert res["metrics"]["fid"]["value"] > 0 and res["metrics"]["is"]["value"] >= 1.0
    assert "one split" in res["metrics"]["is"]["method"]  # ADM's 5,000-sample splits: one split here
    with np.load(out / "shard-00000.npz") as z:
        # spatial: Mixed_6d at 3×3 for a 75-pixel input (17×17, 2023 values, at 299)
        assert z["pool"].shape == (20, 2048) and z["spatial"].shape == (20, 3 * 3 * 7) and z["logits"].shape == (20, 1008)
        assert z["images"].dtype == np.uint8 and z["images"].shape == (20, 16, 16, 3)
        np.testing.assert_array_equal(z["labels"], np.tile([0, 1], 10))
    # statistics-only reference: FID from the file's mu/sigma, without resampling (the shards are reused)
    assert _eval(folders, out, "--reference", folders / "ref_stats_only.npz", "--metrics", "fid") == 0
    assert json.loads((out / "results.json").read_text())["metrics"]["fid"]["value"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--reference", "REF/ref_stats_only.npz", "--metrics", "precision"], "precision, recall and KID need"),
    (["--reference", "REF/ref_bad.npz"], "neither images ('arr_0') nor statistics"),
    (["--reference", "REF/missing.npz"], "does not exist"),
    ([], "give --reference FILE"),
    (["--metrics", "psnr", "--reference", "REF/ref_images.npz"], "give --quant RECIPE"),
    (["--quant", "nope"], "unknown quantization recipe 'nope'"),
    (["--samples", "5"], "too few for 4 jackknife groups"),
])
def test_bad_inputs_are_named(folders, tmp_path, capsys, extra, message):
    extra = [e.replace("REF", str(folders)) for e in extra]
    assert _eval(folders, tmp_path / "bad", *extra) == 2
    assert message in capsys.readouterr().err


def test_inputs_that_are_not_what_eval_needs(folders, tmp_path, capsys):
    assert cli.main(["eval", str(folders / "dit"), "--protocol", "dit-imagenet256", "--out", str(tmp_path / "x"),
                     "--reference", str(folders / "ref_images.npz")]) == 2
    assert "give --inception DIR" in capsys.readouterr().err
    assert cli.main(["eval", str(folders / "inception"), "--out", str(tmp_path / "y")]) == 2
    assert "class-conditional DiTs" in capsys.readouterr().err
    latent = tmp_path / "latent"
    base.save(dit.from_config(dit.Config(input_size=8, patch_size=4, in_channels=4, hidden_size=32, depth=1,
                                         num_heads=2, num_classes=2), key=0), latent)
    assert cli.main(["eval", str(latent), "--out", str(tmp_path / "z"), "--inception", str(folders / "inception"),
                     "--reference", str(folders / "ref_images.npz")]) == 2
    assert "give --vae DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_diverging_model_is_named_and_keeps_finished_shards(folders, tmp_path, capsys):
    model, _ = base.load(folders / "dit")
    bad = tmp_path / "nan_dit"
    params = dict(model.params)
    params["final_layer"] = {**params["final_layer"], "linear": {**params["final_layer"]["linear"]}}
    # finite weights (a NaN weight is refused when the model is loaded) whose outputs overflow in sampling
    params["final_layer"]["linear"]["bias"] = np.full_like(params["final_layer"]["linear"]["bias"], 3e38)
    base.save(model.replace(params=params), bad)
    (bad / "sampling.json").write_text(json.dumps({"pixel_space": True}))
    out = tmp_path / "nan_run"
    code = cli.main(["eval", str(bad), "--protocol", "dit-imagenet256", "--inception", str(folders / "inception"),
                     "--reference", str(folders / "ref_images.npz"), "--steps", "2", "--out", str(out), "--no-progress"])
    assert code == 2 and "contain NaN or Inf" in capsys.readouterr().err
    assert (out / "settings.json").is_file() and not (out / "results.json").exists()
