"""jdq PixArt-Σ against diffusers' ``PixArtTransformer2DModel`` (PyTorch) on tiny random configs.

Float32 outputs agree to relative error 1e-5 (``max|jdq - ref| / max|ref|``); bfloat16 compute
to 3e-2 (measured 0.95e-2 here; diffusers itself in bfloat16 is 0.96e-2 from its float32 output
on the same inputs). Weights come from the torch model through ``checkpoints_convert`` (the state
dict and a saved diffusers folder).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jdq.models  # noqa: E402
from checkpoints_convert import convert_diffusers_folder  # noqa: E402
from checkpoints_convert.common import CheckpointError  # noqa: E402
from checkpoints_convert.pixart import convert_pixart  # noqa: E402
from jdq.models import pixart  # noqa: E402
from jdq.quant import transform as T  # noqa: E402
from torch_reference import randomize, rel_err  # noqa: E402

# Whole float32 forward passes against PyTorch (rel_err: max |Δ| / max |reference|). Worst-case bounds
# (γ_K per layer) are too loose to test anything; independent roundings add in quadrature instead
# (Higham & Mary's probabilistic rounding error analysis): ~√K·u per K-term layer, <= 17·6e-8 = 1e-6 for
# the K <= 300 of these tiny configs, times √L over L <~ 10 layers of depth: ~3e-6, a third of F32_TOL.
# bfloat16 rounds every operand to 8 significant bits (u = 2^-8); the same sum over ~10 layers gives
# ~1e-2, a third of BF16_TOL.
F32_TOL = 1e-5
BF16_TOL = 3e-2

# heads × head_dim = 24 (divisible by 3 and 4: size embeddings and 2-D sin-cos positions).
TINY = dict(num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=24, caption_channels=12, sample_size=8, patch_size=2, norm_num_groups=1)


def tiny_torch(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize(diffusers.PixArtTransformer2DModel(**{**TINY, **overrides}), seed + 1).eval()


def state_dict(m):
    return {k: v.detach().numpy() for k, v in m.state_dict().items()}


def inputs(b=3, h=8, w=12, length=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, 4)).astype(np.float32)
    t = np.array([0.0, 999.0, 321.0][:b], np.float32)
    text = rng.standard_normal((b, length, TINY["caption_channels"])).astype(np.float32)
    mask = np.ones((b, length), np.int64)
    mask[0, 3:] = 0  # sample 0 keeps 3 tokens, sample 2 keeps 1; sample 1 keeps all
    mask[2:, 1:] = 0
    return x, t, text, mask


def torch_out(m, x, t, text, mask=None, resolution=None, aspect_ratio=None):
    added = None if resolution is None else {"resolution": torch.from_numpy(resolution),
                                             "aspect_ratio": torch.from_numpy(aspect_ratio)}
    with torch.no_grad():
        out = m(torch.from_numpy(x).permute(0, 3, 1, 2), encoder_hidden_states=torch.from_numpy(text),
                timestep=torch.from_numpy(t), added_cond_kwargs=added,
                encoder_attention_mask=None if mask is None else torch.from_numpy(mask)).sample
    return out.permute(0, 2, 3, 1).numpy()


def jdq_model(m):
    params, cfg = convert_pixart(state_dict(m), dict(m.config))
    return pixart.from_config(cfg, abstract=True).replace(params=params)


@pytest.fixture(scope="module")
def plain():
    """PixArt-Σ-style (no micro-conditions), converted from a saved diffusers folder."""
    return tiny_torch(0, use_additional_conditions=False)


@pytest.fixture(scope="module")
def plain_folder(plain, tmp_path_factory):
    d = tmp_path_factory.mktemp("pixart")
    plain.save_pretrained(d / "src", safe_serialization=True)
    return convert_diffusers_folder(d / "src", d / "jdq")


def test_f32_with_text_mask_matches_diffusers(plain, plain_folder):
    """Through the diffusers-folder converter and jdq.models.load; a 4×6 patch grid (not the
    config's 4×4: positions recomputed), t up to 999, and a mask hiding some tokens."""
    model, cfg = jdq.models.load(plain_folder)
    assert isinstance(cfg, pixart.Config) and cfg.use_additional_conditions is False
    x, t, text, mask = inputs()
    want = torch_out(plain, x, t, text, mask)
    got = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(text), jnp.asarray(mask))
    assert got.shape == want.shape == (3, 8, 12, 8)
    assert rel_err(got, want) <= F32_TOL
    # The mask matters (so the comparison above tests it) and no mask means "keep all".
    unmasked = torch_out(plain, x, t, text, None)
    assert rel_err(unmasked, want) > 1e-3
    assert rel_err(model(x, t, text), unmasked) <= F32_TOL
    # A sample with every token masked: diffusers' -10000 bias cancels in the softmax (all tokens
    # attended). Compared with diffusers in float64: in float32, logits - 10000 lose ~3 digits.
    mask[1] = 0
    ref64 = torch_out(copy.deepcopy(plain).double(), x.astype(np.float64), t, text.astype(np.float64), mask)
    assert rel_err(model(x, t, text, mask), ref64) <= F32_TOL


def test_f32_with_additional_conditions_and_affine_norms():
    """PixArt-α-style micro-conditions (resolution, aspect ratio) and affine block norms; exact GELU."""
    m = tiny_torch(3, use_additional_conditions=True, norm_elementwise_affine=True, activation_fn="gelu")
    model = jdq_model(m)
    assert model.config.use_additional_conditions and model.config.norm_elementwise_affine
    x, t, text, mask = inputs(seed=1)
    res = np.array([[64.0, 96.0], [512.0, 768.0], [1024.0, 1024.0]], np.float32)
    ar = np.array([[0.67], [0.5], [1.0]], np.float32)
    want = torch_out(m, x, t, text, mask, res, ar)
    assert rel_err(model(x, t, text, mask, res, ar), want) <= F32_TOL
    # Omitted micro-conditions default to diffusers' pipeline values: 8× the latent size and H/W.
    res8 = np.tile(np.array([[64.0, 96.0]], np.float32), (3, 1))
    ar8 = np.full((3, 1), 8 / 12, np.float32)
    assert rel_err(model(x, t, text, mask), torch_out(m, x, t, text, mask, res8, ar8)) <= F32_TOL


def test_bf16_within_bound(plain):
    model = jdq_model(plain)
    model16 = model.with_dtype(jnp.bfloat16)
    x, t, text, mask = inputs(seed=2)
    got = model16(x, t, text, mask)
    assert got.dtype == jnp.bfloat16
    err = rel_err(np.asarray(got, np.float32), torch_out(plain, x, t, text, mask))
    assert 1e-4 < err <= BF16_TOL  # really bf16 (not silently f32), and close


def sites_of(model, x, t, text, mask):
    return T.trace_operands(model.apply, model.params, x, t, text, mask)


def test_every_linear_is_a_site_named_as_diffusers(plain):
    """Each torch nn.Linear / patch Conv2d of diffusers' model is one jdq site of the same name,
    with an input and a weight operand; each attention has its q·kᵀ and p·v sites."""
    model = jdq_model(plain)
    x, t, text, mask = inputs(b=2)
    ops = sites_of(model, x, t, text, mask)
    torch_linears = {n for n, mod in plain.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}
    weight_sites = {o.site for o in ops if o.role == "weight"}
    assert weight_sites == torch_linears
    assert len(torch_linears) == 1 + 2 + 2 + 1 + 2 * 10 + 1  # patch, caption, timestep, adaLN, 2×(8 attn + 2 ff), out
    act = {o.site: o.role for o in ops if o.role in ("act", "post_gelu")}
    assert set(act) == weight_sites
    assert {s for s, r in act.items() if r == "post_gelu"} == {
        "caption_projection.linear_2", "transformer_blocks.0.ff.net.2", "transformer_blocks.1.ff.net.2"}
    attn = sorted((o.site, o.role) for o in ops if o.role in T.ATTENTION_ROLES)
    assert attn == sorted((f"transformer_blocks.{i}.attn{a}.{mm}", r) for i in range(2) for a in (1, 2)
                          for mm, rs in (("qk", ("q", "k")), ("pv", ("attn_prob", "v"))) for r in rs)
    # A plan resolved from the trace quantizes every linear's weight: one per diffusers linear.
    plan = T.resolve([T.rule("*", T.identity(), roles=("weight",))], ops)
    assert len(plan.quantized_keys) == len(torch_linears)
    # Sites are the params paths: each weight operand is the kernel at "<site>.kernel".
    flat = jdq.models.flatten_params(model.params)
    for o in ops:
        if o.role == "weight":
            assert flat[f"{o.site}.kernel"].shape == o.shape


def test_explicit_attention_path_matches(plain):
    """Quantizing nothing but asking for the explicit q·kᵀ / p·v path (with the mask) changes nothing."""
    model = jdq_model(plain)
    x, t, text, mask = inputs(seed=4)
    plan = T.resolve([T.rule("*", T.identity())], sites_of(model, x, t, text, mask))
    got = model(x, t, text, mask, quant=plan.bind(plan.init()))
    assert rel_err(got, torch_out(plain, x, t, text, mask)) <= F32_TOL


def test_converter_names_missing_unexpected_and_misshaped_keys(plain):
    sd, cfg = state_dict(plain), dict(plain.config)
    bad = dict(sd)
    del bad["transformer_blocks.1.attn2.to_k.weight"]
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.attn2\.to_k\.weight.*\(24, 24\)"):
        convert_pixart(bad, cfg)
    bad = {**sd, "transformer_blocks.0.extra.weight": np.zeros((2, 3), np.float32)}
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.extra\.weight \(2, 3\)"):
        convert_pixart(bad, cfg)
    bad = {**sd, "transformer_blocks.0.scale_shift_table": np.zeros((5, 24), np.float32)}
    with pytest.raises(CheckpointError, match=r"scale_shift_table.*\(5, 24\).*\(6, 24\)"):
        convert_pixart(bad, cfg)
    with pytest.raises(CheckpointError, match=r"missing key 'transformer_blocks\.2\."):  # a layer the weights lack
        convert_pixart(sd, {**cfg, "num_layers": 3})
    with pytest.raises(CheckpointError, match="unknown_option"):
        convert_pixart(sd, {**cfg, "unknown_option": 1})


def test_config_from_diffusers_and_round_trip():
    # diffusers' defaults resolve as diffusers resolves them.
    cfg = pixart.Config.from_dict({"_class_name": "PixArtTransformer2DModel", "sample_size": 64, "dropout": 0.0})
    assert cfg.interpolation_scale == 1 and cfg.use_additional_conditions is False and cfg.out_channels == 8
    assert pixart.Config.from_dict({"sample_size": 128}).use_additional_conditions is True
    assert pixart.Config.from_dict(cfg.to_dict()) == cfg
    # The legacy Transformer2DModel spelling of PixArt-Σ's folder.
    legacy = {"_class_name": "Transformer2DModel", **pixart.PIXART_SIGMA_XL_2_1024_MS.to_dict(),
              "only_cross_attention": False, "double_self_attention": False, "num_vector_embeds": None,
              "use_linear_projection": False, "norm_num_groups": 32, "upcast_attention": False}
    assert pixart.Config.from_dict(legacy) == pixart.PIXART_SIGMA_XL_2_1024_MS
    with pytest.raises(ValueError, match="double_self_attention"):
        pixart.Config.from_dict({**legacy, "double_self_attention": True})
    with pytest.raises(ValueError, match="norm_type"):
        pixart.Config(norm_type="ada_norm_zero")


def test_pixart_sigma_1024_abstract_parameter_count():
    """PixArt-Σ-XL/2-1024-MS: 610,856,096 parameters (the paper's 0.6B), equal to diffusers' model
    built from the same config on the meta device."""
    cfg = pixart.PIXART_SIGMA_XL_2_1024_MS
    model = pixart.from_config(cfg, abstract=True)
    assert isinstance(jax.tree.leaves(model.params)[0], jax.ShapeDtypeStruct)
    assert model.num_params == 610_856_096
    kw = {k: v for k, v in cfg.to_dict().items() if k != "dtype"}
    with torch.device("meta"):
        ref = diffusers.PixArtTransformer2DModel(**kw)
    assert model.num_params == sum(p.numel() for p in ref.parameters())
    # A 1024×768 image's latents (128×96) at batch 2 with 300 T5 tokens, abstractly.
    sds = jax.ShapeDtypeStruct
    out = jax.eval_shape(model.apply, model.params, sds((2, 128, 96, 4), jnp.float32), sds((2,), jnp.float32),
                         sds((2, 300, 4096), jnp.float32), sds((2, 300), jnp.int32))
    assert out.shape == (2, 128, 96, 8)
