"""The FID Inception-v3 equals torch-fidelity's ``FeatureExtractorInceptionV3`` (random weights, float32).

The random state dict is written as a ``.pth`` with torchvision's names, loaded *strictly* by
torch-fidelity (so every name and shape is the reference's) and converted by ``jdq convert``, so
the converter is tested along with the model. Tolerance: max |jdq − ref| ≤ 1e-4 · max |ref| per
output (the issue's bound); float32 rounding (2⁻²⁴ per operation) accumulated over the ~50
layers of sums of at most 2048·9 terms is of order 1e-6 relative, so 1e-4 leaves a wide margin
while catching any structural difference (a wrong pool, padding or resize moves features by >1 %).
"""

import numpy as np
import pytest

from metric_references import torch_fidelity

torch = pytest.importorskip("torch")

# max |Δ| / max |reference| of a float32 Inception-v3 against torch-fidelity's: ~20 layers deep, K up to
# 3·3·768; independent roundings add in quadrature (Higham & Mary): √K·u <= 5e-6 per layer, √20 layers
# ~2e-5, a fifth of REL (the worst-case γ_K bound, 4e-4 per layer, would test nothing).
REL = 1e-4


def random_state_dict(seed=0, classes=1008):
    """A torchvision-named Inception-v3 state dict with well-scaled random weights (He convs, BN near identity)."""
    from jdq.models import inception
    from jdq.models.base import flatten_params

    rng = np.random.default_rng(seed)
    abstract = inception.from_config(inception.Config(num_classes=classes), abstract=True)
    sd = {}
    for name, leaf in flatten_params(abstract.params).items():
        module, kind = name.rsplit(".", 1)
        shape = leaf.shape
        if module.endswith(".conv"):
            kh, kw, cin, cout = shape
            sd[f"{module}.weight"] = rng.standard_normal((cout, cin, kh, kw)) * np.sqrt(2.0 / (kh * kw * cin))
        elif module.endswith(".bn"):
            key = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[kind]
            sd[f"{module}.{key}"] = {"scale": lambda: rng.uniform(0.8, 1.2, shape),
                                     "bias": lambda: rng.normal(0, 0.1, shape),
                                     "mean": lambda: rng.normal(0, 0.1, shape),
                                     "var": lambda: rng.uniform(0.5, 1.5, shape)}[kind]()
            if kind == "var":
                sd[f"{module}.num_batches_tracked"] = np.array(0, np.int64)  # as torchvision saves it
        elif module == "fc":
            if kind == "kernel":
                sd["fc.weight"] = rng.standard_normal((shape[1], shape[0])) / np.sqrt(shape[0])
            else:
                sd["fc.bias"] = rng.normal(0, 0.1, shape)
    return {k: torch.as_tensor(np.asarray(v, np.int64 if "num_batches" in k else np.float32)) for k, v in sd.items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(random_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def converted(weights, tmp_path_factory):
    from jdq import cli

    out = tmp_path_factory.mktemp("inception") / "converted"
    assert cli.main(["convert", str(weights), str(out)]) == 0
    from jdq.models import load

    model, cfg = load(out)
    assert model.family == "inception" and cfg.num_classes == 1008
    return model


@pytest.fixture(scope="module")
def reference(weights):
    mod = torch_fidelity("feature_extractor_inceptionv3")["feature_extractor_inceptionv3"]
    ext = mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                          feature_extractor_weights_path=str(weights))
    captured = {}
    ext.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.__setitem__("b1", o.detach()))

    def run(images_nhwc):
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        with torch.no_grad():
            pool, logits_unbiased, logits = ext(x)
        b1 = captured["b1"].permute(0, 2, 3, 1)[..., :7].reshape(x.shape[0], -1)  # NHWC, as TF, first 7 channels
        return {"pool": pool.numpy(), "logits": logits_unbiased.numpy(), "spatial": b1.numpy(),
                "biased": logits.numpy()}
    return run


def _close(ours, ref, what):
    err = np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref))
    assert err <= REL, f"{what}: relative error {err:.2e} > {REL}"


@pytest.mark.slow
@pytest.mark.parametrize("size, batch, grey", [(28, 2, True), (64, 2, False), (299, 1, False)])
def test_features_equal_torch_fidelity(converted, reference, size, batch, grey):
    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, (batch, size, size, 1 if grey else 3), dtype=np.uint8)
    ref = reference(np.repeat(images, 3, axis=-1) if grey else images)  # torch-fidelity takes RGB only
    if grey:  # end to end (grey is repeated to RGB inside)
        out = converted(images)
    else:  # the same path in two calls: the trunk, compiled once at 299×299, serves every size
        out = converted.call("trunk", converted.call("preprocess", images))
    assert set(out) == {"pool", "logits", "spatial"}
    assert out["pool"].shape == (batch, 2048) and out["logits"].shape == (batch, 1008)
    assert out["spatial"].shape == (batch, 17 * 17 * 7)
    for key in ("pool", "logits", "spatial"):
        _close(out[key], ref[key], f"{key} at {size}×{size}")
    if size == 64:  # the classifier's own logits: the unbiased ones plus the kept fc.bias
        _close(out["logits"] + np.asarray(converted.params["fc"]["bias"]), ref["biased"], "biased logits")


def test_resize_matches_torch_fidelity_tf1_bilinear():
    import jax.numpy as jnp

    from jdq.models.inception import resize_bilinear_tf1

    interp = torch_fidelity("interpolate_compat_tensorflow")["interpolate_compat_tensorflow"]
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (1, 13, 21, 3)).astype(np.float32)
    for out in (299, 8):
        ref = interp.interpolate_bilinear_2d_like_tensorflow1x(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                                               size=(out, out), align_corners=False)
        ours = np.asarray(resize_bilinear_tf1(jnp.asarray(x), out)).transpose(0, 3, 1, 2)
        # two lerps of values <= 255 in float32: <= 4 ulp(255) apart whatever the fusing (FMA)
        np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=4 * np.spacing(np.float32(255)))


def test_bad_images_are_named(converted):
    with pytest.raises(TypeError, match="uint8"):
        converted(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="1 or 3"):
        converted(np.zeros((1, 32, 32, 4), np.uint8))


def test_convert_checks_every_key(tmp_path):
    from checkpoints_convert import CheckpointError, convert

    sd = random_state_dict(seed=1)
    extra = dict(sd, **{"AuxLogits.fc.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected key.*AuxLogits"):
        convert(tmp_path / "extra.pth", tmp_path / "out1")
    bad = dict(sd)
    bad["Mixed_6d.branch1x1.conv.weight"] = torch.zeros(192, 768, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"Mixed_6d.branch1x1.conv.weight.*\(192, 768, 3, 3\).*\(192, 768, 1, 1\)"):
        convert(tmp_path / "bad.pth", tmp_path / "out2", kind="inception")
    missing = {k: v for k, v in sd.items() if k != "Mixed_5b.branch_pool.bn.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing key 'Mixed_5b.branch_pool.bn.running_var'"):
        convert(tmp_path / "missing.pth", tmp_path / "out3")
    for name in ("out1", "out2", "out3"):
        assert not (tmp_path / name).exists()  # nothing written on failure
    assert not list(tmp_path.glob(".out*"))  # no temporary folder left behind
