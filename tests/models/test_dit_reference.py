"""jdq DiT against PyTorch references: a DiT built as facebookresearch/DiT builds it (written here
from the paper and the official module definitions; key names as the official checkpoints), and
diffusers' ``DiTTransformer2DModel``. Float32 outputs must agree to relative error 1e-5
(``max|jdq - ref| / max|ref|``); bfloat16 compute to 3e-2.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import jdq.models  # noqa: E402
from checkpoints_convert import convert_diffusers_folder, convert_dit_checkpoint  # noqa: E402
from jdq.models import dit  # noqa: E402
from torch_reference import randomize_dit as randomize, rel_err  # noqa: E402

# Whole float32 forward passes against PyTorch (rel_err: max |Δ| / max |reference|). Worst-case bounds
# (γ_K per layer) are too loose to test anything; independent roundings add in quadrature instead
# (Higham & Mary's probabilistic rounding error analysis): ~√K·u per K-term layer, <= 17·6e-8 = 1e-6 for
# the K <= 300 of these tiny configs, times √L over L <~ 10 layers of depth: ~3e-6, a third of F32_TOL.
# bfloat16 rounds every operand to 8 significant bits (u = 2^-8); the same sum over ~10 layers gives
# ~1e-2, a third of BF16_TOL.
F32_TOL = 1e-5
BF16_TOL = 3e-2


# ---------------------------------------------------------------------------------------------
# A DiT the way facebookresearch/DiT defines it (models.py), NCHW, with its parameter names.
# ---------------------------------------------------------------------------------------------


def ref_pos_embed(dim, grid):
    """MAE/DiT 2-D sin-cos table: meshgrid(w, h); first half embeds grid[0] (w), second grid[1] (h)."""
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)


class RefTimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.freq = freq

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class RefLabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)


class RefPatchEmbed(nn.Module):
    def __init__(self, p, c, hidden):
        super().__init__()
        self.proj = nn.Conv2d(c, hidden, kernel_size=p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def ref_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RefBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        sm, scm, gm, sp, scp, gp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gm.unsqueeze(1) * self.attn(ref_modulate(self.norm1(x), sm, scm))
        return x + gp.unsqueeze(1) * self.mlp(ref_modulate(self.norm2(x), sp, scp))


class RefFinalLayer(nn.Module):
    def __init__(self, dim, p, out_c):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, p * p * out_c)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ref_modulate(self.norm_final(x), shift, scale))


class RefDiT(nn.Module):
    def __init__(self, input_size, p, c, dim, depth, heads, num_classes, learn_sigma=True):
        super().__init__()
        self.p, self.out_c = p, (2 * c if learn_sigma else c)
        self.x_embedder = RefPatchEmbed(p, c, dim)
        self.t_embedder = RefTimestepEmbedder(dim)
        self.y_embedder = RefLabelEmbedder(num_classes, dim)
        grid = input_size // p
        self.pos_embed = nn.Parameter(torch.from_numpy(ref_pos_embed(dim, grid)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList([RefBlock(dim, heads) for _ in range(depth)])
        self.final_layer = RefFinalLayer(dim, p, self.out_c)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, self.p, self.p, self.out_c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], self.out_c, h * self.p, w * self.p)


def inputs(b, size, c, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, size, size, c)).astype(np.float32)
    t = np.array([0.0, 999.0, 500.0, 17.0][:b], np.float32)
    y = np.array([1, num_classes, 0, 3][:b], np.int64)  # includes the null class
    return x, t, y


def torch_out_nhwc(module, x, t, y):
    with torch.no_grad():
        out = module(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y))
    return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A tiny official-layout DiT, saved as a .pt state dict and converted to a jdq folder."""
    torch.manual_seed(0)
    ref = randomize(RefDiT(input_size=8, p=2, c=4, dim=48, depth=2, heads=3, num_classes=10), seed=1).eval()
    d = tmp_path_factory.mktemp("dit_official")
    torch.save(ref.state_dict(), d / "tiny.pt")
    out = convert_dit_checkpoint(d / "tiny.pt", d / "jdq", num_heads=3)
    return ref, out


def test_official_dit_matches_reference_f32(official):
    ref, folder = official
    model, cfg = jdq.models.load(folder)
    assert cfg.source == "facebookresearch/DiT" and cfg.timestep_freq_shift == 0.0
    assert (cfg.input_size, cfg.patch_size, cfg.hidden_size, cfg.depth, cfg.num_classes, cfg.learn_sigma) == \
        (8, 2, 48, 2, 10, True)
    x, t, y = inputs(4, 8, 4, 10)
    want = torch_out_nhwc(ref, x, t, y)
    got = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
    assert got.shape == want.shape == (4, 8, 8, 8)
    assert rel_err(got, want) <= F32_TOL


def test_official_dit_bf16_within_bound(official):
    ref, folder = official
    model, cfg = jdq.models.load(folder)
    model16 = model.with_dtype(jnp.bfloat16)
    x, t, y = inputs(4, 8, 4, 10, seed=3)
    got = model16(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
    assert got.dtype == jnp.bfloat16
    err = rel_err(np.asarray(got, np.float32), torch_out_nhwc(ref, x, t, y))
    assert 1e-4 < err <= BF16_TOL  # really bf16 (not silently f32), and close


def test_official_dit_explicit_attention_path_matches(official):
    """A quantizer that transforms nothing but asks for the explicit q·kᵀ / p·v path changes nothing."""
    ref, folder = official
    model, _ = jdq.models.load(folder)
    from jdq.quant import transform as T

    x, t, y = inputs(2, 8, 4, 10, seed=4)
    ops = T.trace_operands(model.apply, model.params, x, t, y)
    plan = T.resolve([T.rule("*", T.identity())], ops)
    q = plan.bind(plan.init())
    got = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), quant=q)
    assert rel_err(got, torch_out_nhwc(ref, x, t, y)) <= F32_TOL


# ---------------------------------------------------------------------------------------------
# diffusers' DiT port
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_dit(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                        norm_num_groups=1)
    randomize(m, seed=2)
    with torch.no_grad():  # the port copies one embedder into every block; so do real checkpoints
        for blk in m.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(m.transformer_blocks[0].norm1.emb.state_dict())
    m.eval()
    d = tmp_path_factory.mktemp("dit_diffusers")
    m.save_pretrained(d / "src", safe_serialization=True, max_shard_size="20KB")  # sharded, with an index
    assert list((d / "src").glob("*.index.json"))
    return m, convert_diffusers_folder(d / "src", d / "jdq")


def diffusers_out_nhwc(m, x, t, y):
    with torch.no_grad():
        out = m(torch.from_numpy(x).permute(0, 3, 1, 2), timestep=torch.from_numpy(t),
                class_labels=torch.from_numpy(y)).sample
    return out.permute(0, 2, 3, 1).numpy()


def test_diffusers_dit_matches_f32(diffusers_dit):
    m, folder = diffusers_dit
    model, cfg = jdq.models.load(folder)
    assert cfg.source == "diffusers" and cfg.timestep_freq_shift == 1.0 and cfg.mlp_norm_eps == 1e-5
    x, t, y = inputs(4, 8, 4, 10, seed=5)
    assert rel_err(model(x, t, y), diffusers_out_nhwc(m, x, t, y)) <= F32_TOL


def test_timestep_convention_matters(diffusers_dit):
    """The original's frequencies (shift 0) on diffusers' weights do NOT reproduce diffusers."""
    m, folder = diffusers_dit
    model, cfg = jdq.models.load(folder)
    wrong = model.replace(config=cfg.replace(timestep_freq_shift=0.0))
    x, t, y = inputs(4, 8, 4, 10, seed=6)
    assert rel_err(wrong(x, t, y), diffusers_out_nhwc(m, x, t, y)) > 1e-3


# ---------------------------------------------------------------------------------------------
# Real configurations, abstractly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,published_m", [("S/2", 33), ("B/2", 130), ("L/2", 458), ("XL/2", 675)])
def test_published_parameter_counts(variant, published_m):
    """DiT paper Table 1 (33M/130M/458M/675M); XL/2 exactly 675,129,632 with the fixed pos_embed
    buffer that the official code counts (the count DiT's train.py logs, also quoted by SiT)."""
    cfg = dit.Config.variant(variant, 256)
    model = dit.from_config(cfg, abstract=True)
    assert isinstance(jax.tree.leaves(model.params)[0], jax.ShapeDtypeStruct)
    assert abs(model.num_params / 1e6 - published_m) < 0.5
    with_pos = model.num_params + cfg.grid_size**2 * cfg.hidden_size
    if variant == "XL/2":
        assert with_pos == 675_129_632


def test_xl2_512_output_shape_abstract():
    cfg = dit.Config.variant("XL/2", 512)
    model = dit.from_config(cfg, abstract=True)
    out = jax.eval_shape(model.apply, model.params, jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.float32),
                         jax.ShapeDtypeStruct((2,), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32))
    assert out.shape == (2, 64, 64, 8)
