"""jdq's text-to-image pipelines against diffusers' ``PixArtSigmaPipeline`` / ``StableDiffusion3Pipeline``.

Tiny random components (transformer, VAE, T5 / CLIP encoders, tokenizers built in the test) are
saved as a diffusers pipeline folder, converted with ``jdq convert`` and sampled from the same
initial noise (jdq's noise for seed 0, handed to diffusers as ``latents``). Float32 latents and
images agree to 1e-4 relative (``max|jdq - ref| / max|ref|``): the 1e-5 per-forward agreement of
the component tests, accumulated over a few solver steps and guidance (measured ~1e-6).
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from checkpoints_convert import convert  # noqa: E402
from jdq import recipes  # noqa: E402
from jdq.sampling.loop import initial_noise, sample_keys  # noqa: E402
from jdq.sampling.pipelines import PipelineError, TextToImage  # noqa: E402
from tests.models.tiny_tokenizers import make_clip_tokenizer, make_t5_tokenizer  # noqa: E402
from tests.models.torch_reference import rel_err  # noqa: E402

TOL = 1e-4
PROMPTS = ["a photo of a cat", "the red house by the river at night"]


def randomize(module, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1] * math.prod(p.shape[2:])))
            elif ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.copy_(1 + std * torch.randn(p.shape, generator=g))
            elif name != "logit_scale":
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_vae(latent_channels=4, **kw):
    return randomize(diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                             up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                             layers_per_block=1, latent_channels=latent_channels, **kw), 7)


def tiny_t5(vocab, d_model=16, seed=3):
    cfg = transformers.T5Config(vocab_size=vocab, d_model=d_model, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    return randomize(transformers.T5EncoderModel(cfg), seed)


def tiny_clip(vocab, hidden, proj, act, seed):
    cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                      projection_dim=proj, hidden_act=act, bos_token_id=vocab - 2,
                                      eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return randomize(transformers.CLIPTextModelWithProjection(cfg), seed)


def jdq_noise(n, shape):
    """jdq's initial noise for seed 0 (NHWC), and the same as diffusers' NCHW ``latents``."""
    x = np.asarray(initial_noise(sample_keys(0, n), shape))
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def pixart_pipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("pixart")
    tok = transformers.T5Tokenizer.from_pretrained(str(make_t5_tokenizer(d / "tok")))
    transformer = randomize(diffusers.PixArtTransformer2DModel(
        num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=24, caption_channels=16, sample_size=8, patch_size=2, norm_num_groups=1,
        use_additional_conditions=False), 1)
    pipe = diffusers.PixArtSigmaPipeline(tokenizer=tok, text_encoder=tiny_t5(len(tok)), vae=tiny_vae(),
                                         transformer=transformer, scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.save_pretrained(d / "src")
    return pipe, convert(d / "src", d / "jdq")


@pytest.mark.slow  # ~30 s on 2 cores (diffusers and jdq both sample)
def test_pixart_sigma_pipeline_matches_diffusers(pixart_pipe):
    pipe, folder = pixart_pipe
    ours = TextToImage.load(folder)
    noise, latents = jdq_noise(2, (8, 8, 4))
    with torch.no_grad():
        ref = pipe(PROMPTS, negative_prompt="", num_inference_steps=4, guidance_scale=4.5, latents=latents,
                   output_type="latent", use_resolution_binning=False, clean_caption=False,
                   max_sequence_length=300).images
        ref_img = pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample
    lat, img = ours.generate(PROMPTS, "", guidance=4.5, steps=4, seed=0)
    assert rel_err(lat, ref.numpy().transpose(0, 2, 3, 1)) <= TOL
    assert rel_err(img, ref_img.numpy().transpose(0, 2, 3, 1)) <= TOL
    # the prompts matter: another prompt gives other latents
    lat2, _ = ours.generate(PROMPTS[::-1], "", guidance=4.5, steps=4, seed=0, decode=False)
    assert rel_err(lat2, lat) > 1e-3


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3")
    clip_tok = transformers.CLIPTokenizer.from_pretrained(str(make_clip_tokenizer(d / "ctok")), model_max_length=77)
    t5_tok = transformers.T5Tokenizer.from_pretrained(str(make_t5_tokenizer(d / "ttok")))
    v = len(clip_tok)
    transformer = randomize(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=20, out_channels=4,
        pos_embed_max_size=12), 1)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.06, scaling_factor=1.5), text_encoder=tiny_clip(v, 8, 8, "quick_gelu", 2),
        tokenizer=clip_tok, text_encoder_2=tiny_clip(v, 12, 12, "gelu", 4), tokenizer_2=clip_tok,
        text_encoder_3=tiny_t5(len(t5_tok), 32, 5), tokenizer_3=t5_tok)
    pipe.save_pretrained(d / "src")
    return pipe, convert(d / "src", d / "jdq")


@pytest.mark.slow  # ~30 s on 2 cores
def test_sd3_pipeline_matches_diffusers(sd3_pipe):
    pipe, folder = sd3_pipe
    ours = TextToImage.load(folder)
    noise, latents = jdq_noise(2, (8, 8, 4))
    with torch.no_grad():
        ref = pipe(PROMPTS, negative_prompt="a dog", num_inference_steps=3, guidance_scale=5.0, latents=latents,
                   output_type="latent", max_sequence_length=256).images
        z = ref / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        ref_img = pipe.vae.decode(z).sample
    lat, img = ours.generate(PROMPTS, "a dog", guidance=5.0, steps=3, seed=0)
    assert rel_err(lat, ref.numpy().transpose(0, 2, 3, 1)) <= TOL
    assert rel_err(img, ref_img.numpy().transpose(0, 2, 3, 1)) <= TOL


def test_long_prompt_truncates_with_a_warning(pixart_pipe):
    ours = TextToImage.load(pixart_pipe[1])
    long = " ".join(["a photo of a cat"] * 200)
    with pytest.warns(UserWarning, match="truncated"):
        cond = ours.encode([long])
    assert cond["text_emb"].shape[1] == 300 and cond["mask"].all()


def test_broken_pipeline_folders_are_clear_errors(pixart_pipe, tmp_path):
    import json
    import shutil

    from jdq.models.tokenizers import TokenizerError

    src = tmp_path / "p"
    shutil.copytree(pixart_pipe[1], src)
    for f in (src / "tokenizer").iterdir():
        f.unlink()
    with pytest.raises(TokenizerError, match="needs spiece.model or tokenizer.json"):
        TextToImage.load(src)
    # an encoder whose width is not the transformer's caption input
    shutil.rmtree(src)
    shutil.copytree(pixart_pipe[1], src)
    cfg = json.loads((src / "transformer" / "config.json").read_text())
    other = tmp_path / "t5"
    import jdq.models
    from jdq.models import t5

    enc, _ = jdq.models.load(src / "text_encoder")
    jdq.models.save(t5.from_config(enc.config.replace(d_model=20), key=0), other)
    shutil.rmtree(src / "text_encoder")
    shutil.copytree(other, src / "text_encoder")
    with pytest.raises(PipelineError, match=f"width 20 does not match.*{cfg['caption_channels']}"):
        TextToImage.load(src)


@pytest.mark.slow  # ~35 s on 2 cores
def test_cli_sample_and_encode_prompts(pixart_pipe, tmp_path, capsys):
    """``jdq sample PIPELINE --prompt`` writes a PNG; ``jdq encode-prompts`` caches what the pipeline
    computes, and sampling the transformer from that cache gives the same latents."""
    from safetensors.numpy import load_file

    from jdq.cli import main

    folder = pixart_pipe[1]
    out = tmp_path / "s"
    assert main(["sample", str(folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "2",
                 "--negative-prompt", "", "--out", str(out), "--no-progress"]) == 0
    assert (tmp_path / "s.png").is_file()
    lat = np.load(tmp_path / "s.npz")["samples"]
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    cache = tmp_path / "c.safetensors"
    assert main(["encode-prompts", str(folder), "--prompts", str(tmp_path / "p.txt"), "--negative-prompt", "",
                 "--out", str(cache)]) == 0
    arrays = load_file(str(cache))
    assert arrays["text_emb"].shape == (2, 300, 16) and arrays["negative_text_emb"].shape == (1, 300, 16)
    np.testing.assert_array_equal(arrays["text_emb"], TextToImage.load(folder).encode(PROMPTS)["text_emb"])
    neg = tmp_path / "n.safetensors"
    from safetensors.numpy import save_file

    save_file({"text_emb": arrays["negative_text_emb"], "mask": arrays["negative_mask"]}, str(neg))
    assert main(["sample", str(folder / "transformer"), "--embeddings", str(cache), "--negative-embeddings", str(neg),
                 "--vae", str(folder / "vae"), "--steps", "2", "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "t.npz")["samples"], lat, rtol=0, atol=1e-5)
    # the --vae decode of a bare transformer folder gives the pipeline's images (uint8: at most one level off)
    diff = np.abs(np.load(tmp_path / "t.npz")["images"].astype(int) - np.load(tmp_path / "s.npz")["images"].astype(int))
    assert diff.max() <= 1
    # a recipe on the pipeline's transformer: close to the FP latents, not equal
    assert main(["sample", str(folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "2",
                 "--quant", "w8a8", "--out", str(tmp_path / "q"), "--no-progress"]) == 0
    err = rel_err(np.load(tmp_path / "q.npz")["samples"], lat)
    assert 1e-5 < err < 0.2, err
    assert main(["sample", str(folder), "--prompt", PROMPTS[0], "--steps", "2", "--quant-text-encoders", "w8a8",
                 "--out", str(tmp_path / "qt"), "--no-progress"]) == 0
    assert main(["sample", str(folder), "--prompt", PROMPTS[0], "--quant-text-encoders", "w8a8-static",
                 "--out", str(tmp_path / "qt")]) == 2
    # bad input: prompts for a plain model folder, a missing prompts file
    assert main(["sample", str(folder / "transformer"), "--prompt", "x", "--out", str(tmp_path / "u")]) == 2
    assert main(["encode-prompts", str(folder), "--prompts", str(tmp_path / "nope.txt"), "--out", str(cache)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow  # ~25 s on 2 cores
def test_cli_eval_clip_score(pixart_pipe, tmp_path):
    """``jdq eval PIPELINE --metrics clip``: the score equals CLIPScorer on the pipeline's own images."""
    import json

    from jdq.cli import main
    from jdq.metrics.clip_score import CLIPScorer
    from jdq.sampling.images import to_uint8

    tok = transformers.CLIPTokenizer.from_pretrained(str(make_clip_tokenizer(tmp_path / "tok")), model_max_length=77)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path / "clip_src")
    tok.save_pretrained(tmp_path / "clip_src")
    clip_dir = convert(tmp_path / "clip_src", tmp_path / "clip")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    assert main(["eval", str(pixart_pipe[1]), "--metrics", "clip", "--prompts", str(tmp_path / "p.txt"),
                 "--clip", str(clip_dir), "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    _, img = TextToImage.load(pixart_pipe[1]).generate(PROMPTS, "", steps=2, seed=0)
    want = CLIPScorer.load(clip_dir)(to_uint8(img), PROMPTS)
    assert abs(res["metrics"]["clip"]["value"] - want) <= 1e-3
    assert (out / "samples.png").is_file() and (out / "results.md").is_file()
    assert main(["eval", str(pixart_pipe[1]), "--metrics", "clip", "--clip", str(clip_dir), "--out", str(out)]) == 2


def test_sd3_encoder_width_mismatch_is_a_clear_error(sd3_pipe, tmp_path):
    import shutil

    import jdq.models
    from jdq.models import t5

    src = tmp_path / "p"
    shutil.copytree(sd3_pipe[1], src)
    enc, _ = jdq.models.load(src / "text_encoder_3")
    shutil.rmtree(src / "text_encoder_3")
    jdq.models.save(t5.from_config(enc.config.replace(d_model=24), key=0), src / "text_encoder_3")
    with pytest.raises(PipelineError, match="T5.*width 24 does not match.*joint_attention_dim 32"):
        TextToImage.load(src)
    shutil.rmtree(src / "tokenizer_2")
    from jdq.models.tokenizers import TokenizerError

    with pytest.raises(TokenizerError, match="tokenizer_2 does not exist"):
        TextToImage.load(src)


def test_quantized_text_encoders(pixart_pipe):
    """W8A8 on the T5 changes the conditions by int8 rounding (a few percent on this random T5)."""
    pipe = TextToImage.load(pixart_pipe[1])
    fp = pipe.encode(PROMPTS)["text_emb"]
    pipe.encoder_quant = recipes.encoder_quantizers(pipe, "w8a8")
    q = pipe.encode(PROMPTS)["text_emb"]
    err = rel_err(q, fp)
    assert 1e-5 < err < 0.1, err
    with pytest.raises(recipes.RecipeError, match="needs calibration"):
        recipes.encoder_quantizers(pipe, "w8a8-static")


@pytest.mark.slow  # ~30 s on 2 cores (three compiled sweeps through the tiny pipeline)
def test_cli_sensitivity_of_a_pipeline(pixart_pipe, tmp_path, capsys):
    """``jdq sensitivity PIPELINE --prompts FILE``: the transformer's units measured on prompt-conditioned samples."""
    import json

    from jdq.cli import main

    folder = pixart_pipe[1]
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "sens"
    argv = ["sensitivity", str(folder), "--prompts", str(tmp_path / "p.txt"), "--recipe", "mixdq", "--samples", "2",
            "--steps", "2", "--weight-bits", "2", "8", "--act-bits", "8", "--only", "transformer_blocks.0.attn1.to_q",
            "transformer_blocks.0.attn2.to_v", "transformer_blocks.0.ff.net.2",
            "--no-chart", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["settings"]["prompts"] == PROMPTS
    units = data["units"]
    assert [units[n]["group"] for n in sorted(units)] == ["attention", "cross_attention", "ffn"]  # attn1 / attn2 / ff
    for n, u in units.items():
        assert u["metric"] == ("ssim" if u["group"] in ("cross_attention", "ffn") else "sqnr")
        assert n.startswith("transformer_blocks.0.")
        w = u["weight"]
        assert w["8"]["sqnr"] > w["2"]["sqnr"]  # 2-bit weights hurt more than 8-bit ones
        assert 0 < w["2"]["ssim"] <= 1 and set(u["act"]) == {"8"}
    # a pipeline folder without prompts, and prompts for a class-conditional model, are clear errors
    assert main(argv[:2] + argv[4:]) == 2
    assert "--prompts" in capsys.readouterr().err
    assert main(["sensitivity", "--prompts", str(tmp_path / "p.txt"), "--recipe", "mixdq", "--out", str(tmp_path / "x")]) == 2
    assert "pipeline" in capsys.readouterr().err
