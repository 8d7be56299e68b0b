"""jdq AutoencoderKL against diffusers' on tiny random configs (4-channel SD-style and 16-channel
SD3-style with a shift factor and no quant convs): float32 relative error ≤ 1e-5, bf16 ≤ 3e-2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jdq.models  # noqa: E402
from checkpoints_convert import convert_diffusers_folder  # noqa: E402
from jdq.models import vae  # noqa: E402
from torch_reference import randomize_vae as randomize, rel_err  # noqa: E402

# Whole float32 forward passes against PyTorch (rel_err: max |Δ| / max |reference|). Worst-case bounds
# (γ_K per layer) are too loose to test anything; independent roundings add in quadrature instead
# (Higham & Mary's probabilistic rounding error analysis): ~√K·u per K-term layer, <= 17·6e-8 = 1e-6 for
# the K <= 300 of these tiny configs, times √L over L <~ 10 layers of depth: ~3e-6, a third of F32_TOL.
# bfloat16 rounds every operand to 8 significant bits (u = 2^-8); the same sum over ~10 layers gives
# ~1e-2, a third of BF16_TOL.
F32_TOL = 1e-5
BF16_TOL = 3e-2


CONFIGS = {
    "sd4": dict(latent_channels=4, scaling_factor=0.18215),
    "sd3_16": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                   use_post_quant_conv=False),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    m = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
                                **CONFIGS[request.param])
    randomize(m, seed=1)
    d = tmp_path_factory.mktemp(f"vae_{request.param}")
    m.save_pretrained(d / "src", safe_serialization=True)
    model, cfg = jdq.models.load(convert_diffusers_folder(d / "src", d / "jdq"))
    return request.param, m, model, cfg


def image(seed=0, size=16):
    return np.random.default_rng(seed).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def test_config_converted(pair):
    name, m, model, cfg = pair
    assert isinstance(model, vae.VAEModel) and model.family == "vae"
    assert cfg.latent_channels == m.config.latent_channels and cfg.scaling_factor == m.config.scaling_factor
    assert cfg.shift_factor == m.config.shift_factor and cfg.use_quant_conv == m.config.use_quant_conv


def test_encode_matches_f32(pair):
    _, m, model, _ = pair
    x = image(0)
    with torch.no_grad():
        dist = m.encode(nchw(x)).latent_dist
    mean, logvar = model.encode(x)
    assert rel_err(mean, nhwc(dist.mean)) <= F32_TOL
    assert rel_err(logvar, nhwc(dist.logvar)) <= F32_TOL


def test_decode_matches_f32(pair):
    _, m, model, cfg = pair
    z = np.random.default_rng(1).standard_normal((2, 8, 8, cfg.latent_channels)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(m.decode(nchw(z)).sample)
    got = model.decode(z)
    assert got.shape == (2, 16, 16, 3)
    assert rel_err(got, want) <= F32_TOL


def test_scaled_latents_round_trip_and_convention(pair):
    """encode_latents = (mean - shift)·scale, decode_latents inverts the scaling (diffusers pipelines)."""
    _, m, model, cfg = pair
    x = image(2)
    with torch.no_grad():
        mean = nhwc(m.encode(nchw(x)).latent_dist.mean)
    shift = cfg.shift_factor or 0.0
    z = model.encode_latents(x)
    assert rel_err(z, (mean - shift) * cfg.scaling_factor) <= F32_TOL
    with torch.no_grad():
        want = nhwc(m.decode(nchw(np.asarray(z) / cfg.scaling_factor + shift)).sample)
    assert rel_err(model.decode_latents(z), want) <= F32_TOL
    zs = model.encode_latents(x, key=jax.random.key(0))
    assert not np.allclose(zs, z)  # sampling adds noise


def test_bf16_within_bound(pair):
    _, m, model, cfg = pair
    z = np.random.default_rng(3).standard_normal((2, 8, 8, cfg.latent_channels)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(m.decode(nchw(z)).sample)
    got = model.with_dtype(jnp.bfloat16).decode(z)
    assert got.dtype == jnp.bfloat16
    assert 1e-4 < rel_err(np.asarray(got, np.float32), want) <= BF16_TOL


def test_attention_sites_named():
    from jdq.quant.transform import trace_operands

    model = vae.from_config(vae.Config(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1))
    sites = {o.site for o in trace_operands(model.apply, model.params, image(0))}
    want = {f"{p}.mid_block.attentions.0.{s}" for p in ("encoder", "decoder")
            for s in ("to_q", "to_k", "to_v", "to_out.0", "qk", "pv")}
    assert sites == want


def test_sd_vae_parameter_count_matches_diffusers():
    """The real SD VAE (DiT's sd-vae-ft-ema) and SD3's, abstractly, against diffusers on the meta device."""
    for preset, kw in (("sd", {}), ("sd3", CONFIGS["sd3_16"])):
        cfg = vae.Config.preset(preset)
        with torch.device("meta"):
            ref = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512),
                                          down_block_types=("DownEncoderBlock2D",) * 4,
                                          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, **kw)
        assert vae.from_config(cfg, abstract=True).num_params == sum(p.numel() for p in ref.parameters())
    assert vae.from_config(vae.Config.preset("sd"), abstract=True).num_params == 83_653_863
