"""jdq.models.spec: every denoiser family's spec traces its own abstract inputs, and named configs resolve."""

import jax
import pytest

from jdq import quant as Q
from jdq.models import dit, from_config, mmdit, pixart
from jdq.models.spec import denoiser_families, named_config, named_configs, spec_of

TINY = {
    "dit": dit.Config(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10),
    "pixart": pixart.Config(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
                            cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=24,
                            num_embeds_ada_norm=1000),
    "sd3": mmdit.Config(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                        pooled_projection_dim=12, out_channels=4, pos_embed_max_size=8),
}


def test_denoiser_families_have_specs():
    assert set(denoiser_families()) == set(TINY)
    with pytest.raises(ValueError, match="not a denoiser"):
        spec_of("vae")


@pytest.mark.parametrize("family", sorted(TINY))
def test_spec_traces_its_abstract_inputs(family):
    cfg = TINY[family]
    spec = spec_of(cfg)
    model = from_config(cfg, abstract=True)
    inputs = spec.abstract_inputs(cfg, 2)
    out = jax.eval_shape(lambda p, *a: model.apply(p, *a), model.params, *inputs)
    h, w, c = spec.sample_shape(cfg)
    assert out.shape[:3] == (2, h, w) and out.shape[3] >= c  # learned variance doubles the channels
    assert inputs[0].shape == (2, h, w, c)
    ops = Q.trace_operands(model.apply, model.params, *inputs)
    assert any(o.role == "weight" for o in ops)
    assert spec.flow == (family == "sd3") and spec.class_conditional == (family == "dit")
    assert spec.defaults["steps"] >= 1 and "sampler" in spec.defaults


def test_dit_guidance_conventions():
    cfg = TINY["dit"]
    spec = spec_of("dit")
    assert spec.guided_channels(cfg) == cfg.in_channels
    assert spec.guided_channels(cfg.replace(source="facebookresearch/DiT")) == 3
    assert int(spec.null_condition(cfg)[0]) == cfg.num_classes
    with pytest.raises(ValueError, match="no null class"):
        spec.null_condition(cfg.replace(null_class=False))
    assert spec_of("pixart").null_condition is None and spec_of("pixart").text_keys == (("text_emb",), ("mask",))


def test_named_configs():
    assert set(named_configs()) == {"dit-xl-2", "pixart-sigma", "sd3-medium"}
    assert named_config("dit-xl-2").config() == dit.Config.variant("XL/2", 256)
    assert named_config("sd3-medium").config() == mmdit.SD3_MEDIUM and named_config("sd3-medium").steps == 28
    with pytest.raises(KeyError, match="unknown model"):
        named_config("dit-xl-9")
