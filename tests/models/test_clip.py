"""jdq's CLIP towers against transformers' CLIP models (PyTorch) on tiny random configs.

Float32 outputs agree to relative error 1e-5 (``max|jdq - ref| / max|ref|``; measured ~5e-7).
Weights come through the streaming converter from ``save_pretrained`` folders.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jdq.models  # noqa: E402
from checkpoints_convert import convert  # noqa: E402
from checkpoints_convert.common import CheckpointError  # noqa: E402
from jdq.models import clip  # noqa: E402
from torch_reference import rel_err  # noqa: E402

F32_TOL = 1e-5
BOS, EOS, PAD = 48, 49, 0
TEXT = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            max_position_embeddings=12, projection_dim=8, bos_token_id=BOS, pad_token_id=PAD)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8,
              patch_size=4, projection_dim=8)


def randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name != "logit_scale":
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def text_inputs(lengths=(4, 10, 7), n=10, eos=EOS, pad=PAD, seed=0):
    """BOS … EOS rows of different lengths, right-padded; mask 0 on the padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 45, (len(lengths), n))
    mask = np.ones(ids.shape, np.int64)
    for i, k in enumerate(lengths):
        ids[i, 0], ids[i, k - 1] = BOS, eos
        ids[i, k:] = pad
        mask[i, k:] = 0
    return ids, mask


def save_and_load(m, tmp_path, **kw):
    m.save_pretrained(tmp_path / "src", **kw)
    return jdq.models.load(convert(tmp_path / "src", tmp_path / "jdq"))


@pytest.mark.parametrize("act,eos_id", [("quick_gelu", 2), ("gelu", EOS)])
def test_text_with_projection_matches_transformers(act, eos_id, tmp_path):
    """CLIP-L (quick-GELU, legacy eos_token_id=2: pooled at the largest id) and bigG-style (GELU,
    pooled at the first EOS, padding with the EOS id as OpenCLIP's tokenizer does)."""
    cfg = transformers.CLIPTextConfig(**TEXT, hidden_act=act, eos_token_id=eos_id)
    m = randomize(transformers.CLIPTextModelWithProjection(cfg), 1)
    model, jcfg = save_and_load(m, tmp_path, max_shard_size="4KB")
    assert jcfg.text_projection and jcfg.vision is None
    ids, mask = text_inputs(pad=EOS if eos_id == EOS else PAD)
    with torch.no_grad():
        o = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    got = model(jnp.asarray(ids), jnp.asarray(mask))
    for key, want in [("last", o.last_hidden_state), ("penultimate", o.hidden_states[-2]), ("pooled", o.text_embeds)]:
        assert got[key].shape == tuple(want.shape)
        assert rel_err(got[key], want.numpy()) <= F32_TOL, key
    # pooling really is at EOS: another row's EOS position would give another vector
    assert rel_err(got["last"][0, 3], got["last"][0, 4]) > 1e-2


def test_bare_text_model_saved_by_transformers_5(tmp_path):
    """transformers 5 saves CLIPTextModel keys without ``text_model.``; both spellings convert."""
    m = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT, eos_token_id=EOS)), 2)
    model, cfg = save_and_load(m, tmp_path)
    assert not cfg.text_projection
    ids, mask = text_inputs(seed=1)
    with torch.no_grad():
        o = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    got = model(jnp.asarray(ids), jnp.asarray(mask))
    assert rel_err(got["pooled"], o.pooler_output.numpy()) <= F32_TOL
    assert rel_err(got["last"], o.last_hidden_state.numpy()) <= F32_TOL


def test_vision_with_projection_matches_transformers(tmp_path):
    m = randomize(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)), 3)
    model, cfg = save_and_load(m, tmp_path)
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        want = m(pixel_values=torch.tensor(x).permute(0, 3, 1, 2)).image_embeds.numpy()
    assert rel_err(model.call("encode_image", jnp.asarray(x)), want) <= F32_TOL
    with pytest.raises(ValueError, match="no text tower"):
        model(jnp.zeros((1, 3), jnp.int32))


def test_full_clip_model(tmp_path):
    cfg = transformers.CLIPConfig(text_config={**TEXT, "eos_token_id": EOS}, vision_config=VISION, projection_dim=8)
    m = randomize(transformers.CLIPModel(cfg), 4)
    model, jcfg = save_and_load(m, tmp_path)
    assert jcfg.text is not None and jcfg.vision is not None and jcfg.logit_scale
    ids, mask = text_inputs(seed=2)
    x = np.random.default_rng(2).standard_normal((3, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        o = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              pixel_values=torch.tensor(x).permute(0, 3, 1, 2))
    # CLIPModel's forward returns unit-norm embeddings and exp(logit_scale)-scaled cosines
    unit = lambda e: np.asarray(e) / np.linalg.norm(np.asarray(e), axis=-1, keepdims=True)  # noqa: E731
    text = unit(model(jnp.asarray(ids), jnp.asarray(mask))["pooled"])
    image = unit(model.call("encode_image", jnp.asarray(x)))
    assert rel_err(text, o.text_embeds.numpy()) <= F32_TOL
    assert rel_err(image, o.image_embeds.numpy()) <= F32_TOL
    scale = np.exp(float(model.params["logit_scale"]))
    assert rel_err(scale * text @ image.T, o.logits_per_text.numpy()) <= F32_TOL
    np.testing.assert_allclose(float(model.params["logit_scale"]), float(m.logit_scale.detach()), rtol=0)


def test_bf16_within_transformers_own_bf16_error(tmp_path):
    m = randomize(transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TEXT, eos_token_id=EOS, hidden_act="gelu")), 5)
    model, _ = save_and_load(m, tmp_path)
    ids, mask = text_inputs(seed=3)
    with torch.no_grad():
        ref = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).text_embeds.numpy()
        tb = m.to(torch.bfloat16)(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).text_embeds
    torch_err = rel_err(tb.float().numpy(), ref)
    got = model.with_dtype("bfloat16")(jnp.asarray(ids), jnp.asarray(mask))["pooled"]
    assert rel_err(np.asarray(got, np.float32), ref) <= 2 * max(torch_err, 2 ** -8)


def test_wrong_width_names_the_key(tmp_path):
    import json

    m = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT))
    m.save_pretrained(tmp_path / "src")
    c = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**c, "projection_dim": 12}))
    with pytest.raises(CheckpointError, match=r"text_projection.weight.*\(8, 16\).*\(12, 16\)"):
        convert(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_round_trip():
    cfg = clip.Config(text=clip.TextConfig(), vision=clip.VisionConfig(), projection_dim=768, text_projection=True,
                      visual_projection=True)
    assert clip.Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown key"):
        clip.Config.from_dict({**cfg.to_dict(), "colour": 1})


def test_recipes_cover_both_towers_blocks():
    """The recipes' block pattern covers every linear of the text and vision layers; the patch
    embedding and the projections (outside the blocks) stay float, as the embedders do in the DiTs."""
    from jdq import recipes
    from jdq.quant.transform import trace_operands

    cfg = clip.Config(text=clip.TextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, max_position_embeddings=12),
                      vision=clip.VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=8, patch_size=4),
                      projection_dim=8, text_projection=True, visual_projection=True)
    model = clip.from_config(cfg, key=0)

    def both(p, ids, pixels, quant):
        return model.apply(p, ids, quant=quant)["pooled"], model.apply(p, pixels, quant=quant, method="encode_image")

    ops = trace_operands(both, model.params, jnp.zeros((1, 5), jnp.int32), jnp.zeros((1, 8, 8, 3)))
    sites = {k.split(":")[0] for k in recipes.plan_for("w8a8", ops).quantized_keys}
    want = {f"{tower}.encoder.layers.{i}.{name}" for tower in ("text_model", "vision_model") for i in range(2)
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                         "mlp.fc1", "mlp.fc2")}
    assert sites == want
