"""Shared layers against PyTorch/diffusers references: timestep and position embeddings, norms,
patchify (a stride-p conv is a linear over patches), and the site naming contract."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jdq.models import layers
from tests.kernels.kernel_testutil import U32, assert_within_reordering_bound, gamma, normalization_bound

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("flip,shift", [(True, 0.0), (True, 1.0), (False, 1.0), (False, 0.0)])
def test_timestep_embedding_matches_diffusers(flip, shift):
    emb = pytest.importorskip("diffusers.models.embeddings")
    t = np.array([0.0, 1.0, 17.5, 500.0, 999.0], np.float32)
    want = emb.get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    got = layers.timestep_embedding(t, 256, flip_sin_to_cos=flip, freq_shift=shift)
    np.testing.assert_allclose(got, want, atol=_sinusoid_bound(t))
    np.testing.assert_allclose(got[:2], want[:2], atol=_sinusoid_bound(t[:2]))


def _sinusoid_bound(t):
    """Largest difference two float32 implementations of sin(t·f), cos(t·f), f = exp(·) ≤ 1, may show.

    Each side's frequency is within one ulp of exp (torch's float32 exp is not correctly rounded on
    every CPU), so t·f differs by ≤ t·ulp(f) ≤ ulp(t) before, plus half an ulp of t·f from each
    product's rounding: 2·ulp(max t) in the argument, and |d sin| ≤ |d arg|. The sin/cos themselves
    add a few ulp of 1 (libm and XLA are within 2 ulp).
    """
    t_max = np.float32(np.max(np.abs(t)))
    return 2 * float(np.spacing(t_max)) + 4 * float(np.finfo(np.float32).eps)


def test_timestep_embedding_matches_original_dit():
    """facebookresearch/DiT: freqs exp(-ln(1e4)·i/half), [cos, sin]: flip=True, shift=0, odd dims padded."""
    t = torch.tensor([3.0, 250.0, 999.0])
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    want = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).numpy()
    np.testing.assert_allclose(layers.timestep_embedding(t.numpy(), 256), want, atol=_sinusoid_bound(t.numpy()))
    odd = layers.timestep_embedding(t.numpy(), 257)
    assert odd.shape == (3, 257) and np.all(np.asarray(odd[:, -1]) == 0)


@pytest.mark.parametrize("gh,gw,base,scale", [(4, 4, None, 1.0), (6, 4, 3, 2.0), (8, 8, 16, 0.5)])
def test_pos_embed_matches_diffusers(gh, gw, base, scale):
    emb = pytest.importorskip("diffusers.models.embeddings")
    want = emb.get_2d_sincos_pos_embed(64, (gh, gw), base_size=gh if base is None else base,
                                       interpolation_scale=scale, output_type="pt").numpy()
    got = layers.sincos_pos_embed_2d(64, gh, gw, base_size=base, interpolation_scale=scale)
    assert got.shape == (gh * gw, 64) and got.dtype == np.float32
    # both compute sin/cos in float64 from the same float32 positions and round once to float32:
    # float64 values ~1e-16 apart may round to neighbouring float32 values, one spacing at |v| <= 1
    np.testing.assert_allclose(got, want, rtol=0, atol=float(np.spacing(np.float32(1))))


def test_patch_embed_equals_conv():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 12, 3)).astype(np.float32)
    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4)
    with torch.no_grad():
        want = conv(torch.from_numpy(x).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2).numpy()
    w = conv.weight.detach().numpy().transpose(2, 3, 1, 0).reshape(4 * 4 * 3, 5)
    patches = layers.patchify(jnp.asarray(x), 4)
    got = layers.qlinear(patches, w, conv.bias.detach().numpy(), site="x")
    # the conv and the linear are the same 48-term dot products (+ bias) in two summation orders
    abs_sum = np.abs(np.asarray(patches, np.float64)) @ np.abs(w.astype(np.float64)) + np.abs(conv.bias.detach().numpy())
    assert_within_reordering_bound(got, want, abs_sum, 4 * 4 * 3 + 1)
    # unpatchify inverts patchify
    np.testing.assert_array_equal(layers.unpatchify(layers.patchify(jnp.asarray(x), 4), 4, 2, 3), x)
    with pytest.raises(ValueError, match="not divisible by patch size 5"):
        layers.patchify(jnp.asarray(x), 5)


def test_norms_match_torch():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 5, 8, 16)) * 3 + 1).astype(np.float32)
    s, b = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    tx = torch.from_numpy(x)
    # torch (Welford / its own reduction order and rsqrt) and XLA differ by float32 rounding only:
    # within the first-order bound of two implementations of a normalisation (normalization_bound)
    want = torch.nn.functional.layer_norm(tx, (16,), torch.from_numpy(s), torch.from_numpy(b), eps=1e-5).numpy()
    bound = normalization_bound(x, (-1,), s, b, eps=1e-5)
    assert np.all(np.abs(np.asarray(layers.layer_norm(x, s, b, eps=1e-5), np.float64) - want) <= bound)
    want = torch.nn.functional.group_norm(tx.permute(0, 3, 1, 2), 4, torch.from_numpy(s), torch.from_numpy(b),
                                          eps=1e-6).permute(0, 2, 3, 1).numpy()
    xg = x.reshape(2, 5, 8, 4, 4)  # (..., group, channel in group): statistics over H, W and the group's channels
    bound = normalization_bound(xg, (1, 2, 4), s.reshape(4, 4), b.reshape(4, 4), eps=1e-6).reshape(x.shape)
    assert np.all(np.abs(np.asarray(layers.group_norm(x, 4, s, b, eps=1e-6), np.float64) - want) <= bound)
    want = torch.nn.functional.rms_norm(tx, (16,), torch.from_numpy(s), eps=1e-6).numpy()
    bound = normalization_bound(x, (-1,), s, eps=1e-6, center=False)
    assert np.all(np.abs(np.asarray(layers.rms_norm(x, s, eps=1e-6), np.float64) - want) <= bound)
    y = layers.layer_norm(x.astype(jnp.bfloat16), eps=1e-6)
    assert y.dtype == jnp.bfloat16


def test_mlp_roles_and_gelu_tanh():
    from flax import nnx

    from jdq.quant.transform import OperandRecorder

    mlp = layers.Mlp(8, 32, site="blocks.0.mlp", rngs=nnx.Rngs(params=0))
    rec = OperandRecorder()
    x = jnp.ones((2, 3, 8))
    y = mlp(x, rec)
    assert [(o.site, o.role) for o in rec.operands] == [
        ("blocks.0.mlp.fc1", "act"), ("blocks.0.mlp.fc1", "weight"),
        ("blocks.0.mlp.fc2", "post_gelu"), ("blocks.0.mlp.fc2", "weight")]
    h = x @ mlp.fc1.kernel[...] + mlp.fc1.bias[...]
    tg = torch.nn.functional.gelu(torch.from_numpy(np.array(h)), approximate="tanh").numpy()
    w2, b2 = np.asarray(mlp.fc2.kernel[...], np.float64), np.asarray(mlp.fc2.bias[...], np.float64)
    want = tg.astype(np.float64) @ w2 + b2
    # h: the same 8-term dot in two orders; gelu: |gelu'| <= 1.13, plus ~8 roundings / ulps of the tanh
    # form in each implementation; then the 32-term fc2 dot in two orders (float32 reordering bound)
    w1, b1 = np.asarray(mlp.fc1.kernel[...], np.float64), np.asarray(mlp.fc1.bias[...], np.float64)
    dh = 2 * gamma(9) * (np.abs(np.asarray(x, np.float64)) @ np.abs(w1) + np.abs(b1))
    dg = 1.13 * dh + 2 * 8 * U32 * (np.abs(np.asarray(h, np.float64)) + np.abs(tg))
    bound = dg @ np.abs(w2) + 2 * gamma(33) * (np.abs(tg) @ np.abs(w2) + np.abs(b2))
    assert np.all(np.abs(np.asarray(y, np.float64) - want) <= bound)


def test_every_linear_site_is_its_param_path():
    """The contract that lets weight-side tools find a site's weight: params[S + '.kernel']."""
    from flax import nnx

    from jdq.models import dit, vae

    for fam, cfg in ((dit, dit.Config(input_size=8, hidden_size=32, depth=2, num_heads=4, num_classes=5)),
                     (vae, vae.Config(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1))):
        module = nnx.eval_shape(lambda: fam.build(cfg, nnx.Rngs(params=0)))
        linears = [(p, m) for p, m in nnx.iter_modules(module) if isinstance(m, layers.Linear)]
        assert linears
        for path, m in linears:
            assert m.site == ".".join(str(k) for k in path)


def test_self_attention_qk_norm_is_the_diffusers_head_norm():
    """SelfAttention's QK-norm is :func:`layers.head_norm` (diffusers' spellings); others name the site."""
    from flax import nnx

    attn = layers.SelfAttention(16, 2, site="blocks.0.attn", rngs=nnx.Rngs(params=0), qk_norm="rms_norm")
    assert isinstance(attn.norm_q, layers.RMSNorm) and attn.norm_q.scale.shape == (8,)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 16)), jnp.float32)
    plain = layers.SelfAttention(16, 2, site="blocks.0.attn", rngs=nnx.Rngs(params=0))
    assert not np.allclose(attn(x), plain(x))  # same weights, the norm changes q and k
    with pytest.raises(ValueError, match=r"blocks\.0\.attn.*qk_norm must be None, 'rms_norm' or 'layer_norm', got 'rms'"):
        layers.SelfAttention(16, 2, site="blocks.0.attn", rngs=nnx.Rngs(params=0), qk_norm="rms")
