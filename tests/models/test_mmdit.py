"""jdq SD3 / SD3.5 MMDiT against diffusers' ``SD3Transformer2DModel`` (PyTorch) on tiny random configs.

Float32 outputs agree to relative error 1e-5 (``max|jdq - ref| / max|ref|``; measured 2e-6: at
t=999 one-ulp differences between PyTorch's float32 ``exp`` and a correctly rounded one in three
timestep frequencies show); bfloat16 compute to 3e-2 (measured 1.3–1.5e-2; diffusers itself in
bfloat16 is 1.5–1.6e-2 from its float32 output on the same inputs). Weights come from the torch
model through ``checkpoints_convert``.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from checkpoints_convert.common import CheckpointError  # noqa: E402
from checkpoints_convert.sd3 import convert_sd3  # noqa: E402
from jdq.models import flatten_params, mmdit  # noqa: E402
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

# SD3-medium's structure shrunk: 3 blocks (the last context-pre-only), hidden 2×8, a 12×12
# position table cropped to the latent's grid.
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=12)
# SD3.5-medium's additions: RMS QK-norm and dual attention in the first blocks.
TINY35 = dict(TINY, qk_norm="rms_norm", dual_attention_layers=(0, 1))


def state_dict(m):
    return {k: v.detach().numpy() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def pair(request):
    """(torch model, jdq model) for the SD3-medium-style and the SD3.5-style tiny config."""
    torch.manual_seed(0)
    kw = TINY if request.param == "sd3" else TINY35
    m = randomize(diffusers.SD3Transformer2DModel(**kw), seed=1).eval()
    params, cfg = convert_sd3(state_dict(m), dict(m.config))
    return m, mmdit.from_config(cfg, abstract=True).replace(params=params)


def inputs(b=2, h=8, w=12, length=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, 4)).astype(np.float32)
    t = np.array([999.0, 3.5, 500.0][:b], np.float32)
    text = rng.standard_normal((b, length, TINY["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((b, TINY["pooled_projection_dim"])).astype(np.float32)
    return x, t, text, pooled


def torch_out(m, x, t, text, pooled):
    with torch.no_grad():
        out = m(torch.from_numpy(x).permute(0, 3, 1, 2), encoder_hidden_states=torch.from_numpy(text),
                pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t)).sample
    return out.permute(0, 2, 3, 1).numpy()


def test_f32_matches_diffusers(pair):
    """A 4×6 patch grid, centre-cropped from the 12×12 table; SD3.5: QK-norm + dual attention."""
    m, model = pair
    x, t, text, pooled = inputs()
    want = torch_out(m, x, t, text, pooled)
    got = model(x, t, text, pooled)
    assert got.shape == want.shape == (2, 8, 12, 4)
    assert rel_err(got, want) <= F32_TOL


def test_diffusers_folder_round_trip(tmp_path):
    """SD3.5-style folder → checkpoints_convert → jdq.models.load → same output as diffusers."""
    import jdq.models
    from checkpoints_convert import convert_diffusers_folder

    torch.manual_seed(0)
    m = randomize(diffusers.SD3Transformer2DModel(**TINY35), seed=5).eval()
    m.save_pretrained(tmp_path / "src", safe_serialization=True)
    model, cfg = jdq.models.load(convert_diffusers_folder(tmp_path / "src", tmp_path / "jdq"))
    assert cfg == mmdit.Config(**TINY35)
    x, t, text, pooled = inputs(seed=7)
    assert rel_err(model(x, t, text, pooled), torch_out(m, x, t, text, pooled)) <= F32_TOL


@pytest.mark.slow
def test_bf16_within_bound(pair):
    m, model = pair
    assert model.family == "sd3"
    model16 = model.with_dtype(jnp.bfloat16)
    x, t, text, pooled = inputs(seed=1)
    got = model16(x, t, text, pooled)
    assert got.dtype == jnp.bfloat16
    err = rel_err(np.asarray(got, np.float32), torch_out(m, x, t, text, pooled))
    assert 1e-4 < err <= BF16_TOL  # really bf16 (not silently f32), and close


def test_every_linear_is_a_site_named_as_diffusers(pair):
    """Each torch nn.Linear / patch Conv2d is one jdq site of the same name (input + weight
    operands); each joint attention and each SD3.5 attn2 has its q·kᵀ and p·v sites."""
    m, model = pair
    x, t, text, pooled = inputs()
    ops = T.trace_operands(model.apply, model.params, x, t, text, pooled)
    torch_linears = {n for n, mod in m.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}
    weight_sites = {o.site for o in ops if o.role == "weight"}
    assert weight_sites == torch_linears
    dual = model.config.dual_attention_layers
    # patch, 2+2 embedders, context; blocks 0-1: 2 adaLN + 8 joint attn + 4 MLP (+ 4 attn2);
    # last block: 2 adaLN + 7 attn (no to_add_out) + 2 MLP; norm_out, proj_out.
    assert len(torch_linears) == 1 + 4 + 1 + 2 * 14 + 4 * len(dual) + 11 + 2
    act = {o.site: o.role for o in ops if o.role in ("act", "post_gelu")}
    assert set(act) == weight_sites
    assert {s for s, r in act.items() if r == "post_gelu"} == (
        {f"transformer_blocks.{i}.ff.net.2" for i in range(3)} | {f"transformer_blocks.{i}.ff_context.net.2" for i in range(2)})
    attn_sites = {o.site for o in ops if o.role in T.ATTENTION_ROLES}
    assert attn_sites == {f"transformer_blocks.{i}.attn.{mm}" for i in range(3) for mm in ("qk", "pv")} | {
        f"transformer_blocks.{i}.attn2.{mm}" for i in dual for mm in ("qk", "pv")}
    joint_q = next(o for o in ops if o.site == "transformer_blocks.0.attn.qk" and o.role == "q")
    assert joint_q.shape == (2, 2, 4 * 6 + 5, 8)  # (B, heads, image + text tokens, head_dim)
    plan = T.resolve([T.rule("*", T.identity(), roles=("weight",))], ops)
    assert len(plan.quantized_keys) == len(torch_linears)
    flat = flatten_params(model.params)
    for o in ops:
        if o.role == "weight":
            assert flat[f"{o.site}.kernel"].shape == o.shape


def test_explicit_attention_path_matches(pair):
    m, model = pair
    x, t, text, pooled = inputs(seed=2)
    plan = T.resolve([T.rule("*", T.identity())], T.trace_operands(model.apply, model.params, x, t, text, pooled))
    got = model(x, t, text, pooled, quant=plan.bind(plan.init()))
    assert rel_err(got, torch_out(m, x, t, text, pooled)) <= F32_TOL


def test_converter_checks_keys_shapes_and_position_table():
    torch.manual_seed(0)
    m = diffusers.SD3Transformer2DModel(**TINY35)
    sd, cfg = state_dict(m), dict(m.config)
    bad = dict(sd)
    del bad["transformer_blocks.1.attn.norm_added_k.weight"]
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.attn\.norm_added_k\.weight.*\(8,\)"):
        convert_sd3(bad, cfg)
    bad = {**sd, "transformer_blocks.2.attn.to_add_out.weight": np.zeros((16, 16), np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected.*transformer_blocks\.2\.attn\.to_add_out\.weight \(16, 16\)"):
        convert_sd3(bad, cfg)
    bad = {**sd, "context_embedder.weight": np.zeros((16, 13), np.float32)}
    with pytest.raises(CheckpointError, match=r"context_embedder\.weight.*\(16, 13\).*\(16, 12\)"):
        convert_sd3(bad, cfg)
    # A dual-attention-free config on SD3.5 weights: the 9-chunk adaLN of block 0 does not fit.
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.norm1\.linear\.\w+' has shape \(144"):
        convert_sd3(sd, {**cfg, "dual_attention_layers": []})
    # The stored position table must be the config's (here: built for another sample_size).
    bad = {**sd, "pos_embed.pos_embed": state_dict(diffusers.SD3Transformer2DModel(**{**TINY35, "sample_size": 16}))[
        "pos_embed.pos_embed"]}
    with pytest.raises(CheckpointError, match=r"pos_embed\.pos_embed differs"):
        convert_sd3(bad, cfg)
    # ... but a half-precision copy of it is accepted.
    half = {**sd, "pos_embed.pos_embed": sd["pos_embed.pos_embed"].astype(np.float16).astype(np.float32)}
    convert_sd3(half, cfg)


def test_config_round_trip_and_grid_limit():
    cfg = mmdit.Config.from_dict({"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.29.0",
                                  **{k: v for k, v in mmdit.SD35_MEDIUM.to_dict().items() if k != "dtype"}})
    assert cfg == mmdit.SD35_MEDIUM and cfg.dual_attention_layers == tuple(range(13))
    assert mmdit.Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="qk_norm"):
        mmdit.Config(qk_norm="l2", num_attention_heads=18, caption_projection_dim=1152)
    model = mmdit.from_config(mmdit.Config(**TINY), abstract=True)
    sds = jax.ShapeDtypeStruct
    with pytest.raises(ValueError, match="pos_embed_max_size=12"):
        jax.eval_shape(model.apply, model.params, sds((1, 26, 8, 4), jnp.float32), sds((1,), jnp.float32),
                       sds((1, 5, 12), jnp.float32), sds((1, 10), jnp.float32))


@pytest.mark.parametrize("name,count", [("SD3_MEDIUM", 2_028_328_000), ("SD35_MEDIUM", 2_243_171_520)])
def test_published_configs_abstract_parameter_count(name, count):
    """SD3-medium: 2,028,328,000 parameters (the SD3 paper's "2B"); SD3.5-medium's transformer
    2,243,171,520 (its model card says "2.5B"). Both equal diffusers' model built from the same
    config on the meta device."""
    cfg = getattr(mmdit, name)
    model = mmdit.from_config(cfg, abstract=True)
    assert model.num_params == count
    kw = {k: v for k, v in cfg.to_dict().items() if k != "dtype"}
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**kw)
    assert model.num_params == sum(p.numel() for p in ref.parameters())
    sds = jax.ShapeDtypeStruct
    out = jax.eval_shape(model.apply, model.params, sds((2, 128, 96, 16), jnp.float32), sds((2,), jnp.float32),
                         sds((2, 333, 4096), jnp.float32), sds((2, 2048), jnp.float32))
    assert out.shape == (2, 128, 96, 16)
