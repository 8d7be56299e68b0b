"""jdq's T5 encoder against transformers' ``T5EncoderModel`` (PyTorch) on tiny random configs.

Float32 last hidden states agree to relative error 1e-5 (``max|jdq - ref| / max|ref|``; measured
~1e-6: float32 sums in another order over a few layers). Weights come through the streaming
converter from folders ``save_pretrained`` writes (one file and sharded).
"""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jdq.models  # noqa: E402
from checkpoints_convert import convert  # noqa: E402
from checkpoints_convert.common import CheckpointError  # noqa: E402
from checkpoints_convert.transformers_text import convert_transformers_arrays  # noqa: E402
from jdq.models import t5  # noqa: E402
from torch_reference import rel_err  # noqa: E402

# float32 through 3 layers: the gated-GELU's tanh differs by a few ulp between XLA's vectorized CPU tanh and
# torch's (1.2e-5 measured on one CPU, below 1e-5 on another), and T5's unscaled attention logits amplify it;
# 5e-5 stays two orders of magnitude below the masking effect the test checks (> 1e-3).
F32_TOL = 5e-5
TINY = dict(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8, relative_attention_max_distance=10, decoder_start_token_id=0)


def randomize(m, seed, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return m.eval()


def tiny_torch(seed=0, cls=None, std=0.5, **overrides):
    cls = cls or transformers.T5EncoderModel
    return randomize(cls(transformers.T5Config(**{**TINY, **overrides})), seed, std)


def token_inputs(b=3, n=13, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, TINY["vocab_size"], (b, n))
    mask = np.ones((b, n), np.int64)
    for i, keep in enumerate([5, n, 9][:b]):  # masked tails of different lengths, padded with id 0
        ids[i, keep:] = 0
        mask[i, keep:] = 0
    return ids, mask


def torch_out(m, ids, mask=None):
    with torch.no_grad():
        return m(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask)
                 ).last_hidden_state.float().numpy()


def test_relative_position_buckets_match_transformers():
    """Every distance up to ±700 and several bucket settings, including the log-bucket boundaries."""
    rel = torch.arange(700)[None, :] - torch.arange(700)[:, None]
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for buckets, dist in [(32, 128), (8, 10), (16, 20), (64, 300)]:
        want = ref(rel, bidirectional=True, num_buckets=buckets, max_distance=dist).numpy()
        np.testing.assert_array_equal(t5.relative_position_buckets(700, 700, buckets, dist), want)


@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_f32_with_masked_tails_matches_transformers(ff, tmp_path):
    """Through save_pretrained -> jdq convert (sharded folder) -> jdq.models.load."""
    m = tiny_torch(1, feed_forward_proj=ff)
    src = tmp_path / "t5"
    m.save_pretrained(src, max_shard_size="5KB")
    assert list(src.glob("*.index.json")), "the folder should be sharded"
    out = convert(src, tmp_path / "jdq")
    model, cfg = jdq.models.load(out)
    assert isinstance(cfg, t5.Config) and cfg.feed_forward_proj == ff and cfg.num_layers == 3
    ids, mask = token_inputs()
    want = torch_out(m, ids, mask)
    got = model(jnp.asarray(ids), jnp.asarray(mask))
    assert got.shape == want.shape == (3, 13, 16)
    assert rel_err(got, want) <= F32_TOL
    # The mask matters (so the comparison above tests it), and no mask keeps every token.
    unmasked = torch_out(m, ids)
    assert rel_err(unmasked, want) > 1e-3
    assert rel_err(model(jnp.asarray(ids)), unmasked) <= F32_TOL


def test_bf16_within_transformers_own_bf16_error():
    """jdq computing in bf16 is as far from the float32 reference as transformers in bf16 is (×2 margin)."""
    m = tiny_torch(2)
    family, params, cfg = convert_transformers_arrays(m.state_dict(), m.config.to_dict())
    model = t5.from_config(cfg, abstract=True).replace(params=params).with_dtype("bfloat16")
    ids, mask = token_inputs(seed=3)
    ref = torch_out(m, ids, mask)
    torch_bf16 = rel_err(torch_out(m.to(torch.bfloat16), ids, mask), ref)
    got = model(jnp.asarray(ids), jnp.asarray(mask))
    assert got.dtype == jnp.bfloat16
    assert rel_err(np.asarray(got, np.float32), ref) <= 2 * max(torch_bf16, 2 ** -8)


def test_full_t5_converts_its_encoder_with_a_warning(tmp_path):
    full = tiny_torch(4, cls=transformers.T5ForConditionalGeneration)
    full.save_pretrained(tmp_path / "full")
    with pytest.warns(UserWarning, match="encoder only"):
        out = convert(tmp_path / "full", tmp_path / "jdq")
    model, _ = jdq.models.load(out)
    enc = transformers.T5EncoderModel(full.config)
    enc.load_state_dict({k: v for k, v in full.state_dict().items() if k.startswith(("shared", "encoder"))},
                        strict=False)
    ids, mask = token_inputs(seed=5)
    assert rel_err(model(jnp.asarray(ids), jnp.asarray(mask)), torch_out(enc.eval(), ids, mask)) <= F32_TOL


def test_decoder_and_bad_folders_are_clear_errors(tmp_path):
    m = tiny_torch(0)
    m.save_pretrained(tmp_path / "t5")
    cfg = json.loads((tmp_path / "t5" / "config.json").read_text())
    (tmp_path / "dec").mkdir()
    (tmp_path / "dec" / "config.json").write_text(json.dumps({**cfg, "is_decoder": True}))
    with pytest.raises(CheckpointError, match="decoder"):
        convert(tmp_path / "dec", tmp_path / "o1")
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(llama))
    with pytest.raises(CheckpointError, match="decoder"):
        convert(tmp_path / "llama", tmp_path / "o2")
    # A width that disagrees with the weights names the key and both shapes.
    (tmp_path / "t5" / "config.json").write_text(json.dumps({**cfg, "d_ff": 30}))
    with pytest.raises(CheckpointError, match=r"wi_0.weight.*\(24, 16\).*\(30, 16\)"):
        convert(tmp_path / "t5", tmp_path / "o3")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_t5_xxl_shapes_and_quantization_sites():
    """The published T5-XXL encoder's parameter count (transformers on the meta device) and its sites."""
    with torch.device("meta"):
        ref = transformers.T5EncoderModel(transformers.T5Config(
            d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"))
    n_ref = sum(p.numel() for p in ref.parameters())
    abstract = t5.from_config(t5.T5_V1_1_XXL, abstract=True)
    assert abstract.num_params == n_ref == 4_762_310_656
    small = t5.from_config(t5.Config.from_transformers(TINY), key=0)
    ops = _operands(small, jnp.zeros((1, 5), jnp.int32))
    sites = {o.site for o in ops}
    assert "encoder.block.2.layer.1.DenseReluDense.wo" in sites
    assert "encoder.block.0.layer.0.SelfAttention.qk" in sites


def _operands(model, *inputs):
    from jdq.quant.transform import trace_operands

    return trace_operands(lambda p, *a, quant: model.apply(p, *a, quant=quant), model.params, *inputs)


def test_recipes_quantize_the_encoder_blocks():
    """W8A8 covers every linear of the T5 blocks (the embedding stays float) and changes the output
    by about int8's rounding: per-element relative error <= 2^-8 on both operands, a few percent
    after three layers (weights of std 0.15: larger ones saturate T5's unscaled softmax, where
    any perturbation flips the attended token)."""
    from jdq import recipes

    m = tiny_torch(6, std=0.15)
    _, params, cfg = convert_transformers_arrays(m.state_dict(), m.config.to_dict())
    model = t5.from_config(cfg, abstract=True).replace(params=params)
    ids, mask = token_inputs(seed=7)
    plan = recipes.plan_for("w8a8", _operands(model, jnp.asarray(ids), jnp.asarray(mask)))
    sites = {k.split(":")[0] for k in plan.quantized_keys}
    linear = {f"encoder.block.{i}.layer.{j}.{n}" for i in range(3)
              for j, names in [(0, ["SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o"]),
                               (1, ["DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo"])]
              for n in names}
    assert sites == linear
    fp = model(jnp.asarray(ids), jnp.asarray(mask))
    q = model(jnp.asarray(ids), jnp.asarray(mask), quant=plan.bind(plan.init(None)))
    err = rel_err(q, fp)
    assert 1e-4 < err < 0.05, err


def test_weight_storage_per_recipe_from_abstract_shapes():
    """Brute force on a tiny T5 (w8a8: int8 kernels + one float32 scale per output channel, the
    rest bf16) and the exact bf16 size of T5-XXL (2 bytes x 4,762,310,656 params)."""
    from jdq import recipes
    from jdq.models.base import flatten_params
    from jdq.quant.memory import weight_storage

    model = t5.from_config(t5.Config.from_transformers(TINY), abstract=True)
    plan = recipes.plan_for("w8a8", _operands(model, jnp.zeros((1, 5), jnp.int32)))
    want = 0.0
    for name, leaf in flatten_params(model.params).items():
        n = int(np.prod(leaf.shape))
        if name.startswith("encoder.block.") and name.endswith(".kernel"):
            want += n + 4 * leaf.shape[1]  # n int8 values, one float32 scale per output channel
        else:
            want += 2 * n
    assert weight_storage(model.params, plan)["bytes"] == pytest.approx(want, rel=1e-12)
    xxl = t5.from_config(t5.T5_V1_1_XXL, abstract=True)
    assert weight_storage(xxl.params, None)["bytes"] == 2 * 4_762_310_656


def test_jdq_convert_command(tmp_path, capsys):
    from jdq.cli import main

    tiny_torch(0).save_pretrained(tmp_path / "t5")
    assert main(["convert", str(tmp_path / "t5"), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    model, _ = jdq.models.load(tmp_path / "out")
    assert {str(x.dtype) for x in jax.tree.leaves(model.params)} == {"bfloat16"}
    (tmp_path / "dec").mkdir()
    cfg = json.loads((tmp_path / "t5" / "config.json").read_text())
    (tmp_path / "dec" / "config.json").write_text(json.dumps({**cfg, "is_decoder": True}))
    assert main(["convert", str(tmp_path / "dec"), str(tmp_path / "o2")]) == 2
    assert "decoder" in capsys.readouterr().err
