"""CLIP score against torchmetrics' definition computed with transformers' CLIPModel and CLIPProcessor.

The reference is torchmetrics' ``clip_score`` written out in the test (torchmetrics itself is
not a dependency): ``processor(text, padding=True)`` -> ``get_text_features``, ``processor(images)``
-> ``get_image_features``, unit-normalise, ``100 · sum``, then ``max(mean, 0)``. jdq's embeddings
agree to 1e-5 relative (the model tests), so a pair's ``100 · cos`` moves by at most
``100 · 2 · 2e-5 = 4e-3``; the preprocessing is the same float32 arithmetic (1e-6).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from checkpoints_convert import convert  # noqa: E402
from jdq.metrics.clip_score import CLIPScorer, clip_score_from_embeddings, pair_scores, preprocess  # noqa: E402
from tests.models.tiny_tokenizers import make_clip_tokenizer  # noqa: E402

PROMPTS = ["a photo of a cat", "the red house by the river", "a dog", "green trees under blue sky at night"]


def features(out):
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    tok = transformers.CLIPTokenizer.from_pretrained(str(make_clip_tokenizer(d / "tok")), model_max_length=77)
    v = len(tok)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=8, patch_size=4), projection_dim=8)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.mul_(8.0)  # larger than the init, so the cosines spread
    proc = transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessor(
        size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}), tokenizer=tok)
    model.save_pretrained(d / "src")
    proc.save_pretrained(d / "src")
    return model, proc, convert(d / "src", d / "jdq")


def images(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 11, 13, 3), dtype=np.uint8)


def test_preprocessing_matches_clip_image_processor(clip_folder):
    _, proc, _ = clip_folder
    x = images()
    want = proc(images=[torch.from_numpy(i).permute(2, 0, 1) for i in x], return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(preprocess(x, 8, 8), want.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)


def test_clip_score_matches_torchmetrics_definition(clip_folder):
    model, proc, folder = clip_folder
    x = images(seed=1)
    with torch.no_grad():
        t = proc(text=PROMPTS, return_tensors="pt", padding=True)
        txt = features(model.get_text_features(t["input_ids"], t["attention_mask"]))
        pix = proc(images=[torch.from_numpy(i).permute(2, 0, 1) for i in x], return_tensors="pt")["pixel_values"]
        img = features(model.get_image_features(pix))
    txt, img = txt / np.linalg.norm(txt, axis=-1, keepdims=True), img / np.linalg.norm(img, axis=-1, keepdims=True)
    ref_pairs = 100 * np.sum(img * txt, axis=-1)
    ref = max(float(np.mean(ref_pairs)), 0.0)
    scorer = CLIPScorer.load(folder)
    ours_img, ours_txt = scorer.embeddings(x, PROMPTS)
    np.testing.assert_allclose(pair_scores(ours_img, ours_txt), ref_pairs, rtol=0, atol=4e-3)
    assert abs(scorer(x, PROMPTS) - ref) <= 4e-3
    assert np.ptp(ref_pairs) > 1.0  # the pairs differ, so matching them tests the pairing


def test_the_mean_is_clamped_at_zero():
    a = np.array([[1.0, 0.0], [1.0, 0.0]])
    b = np.array([[-1.0, 0.1], [0.5, 0.5]])
    assert clip_score_from_embeddings(a, b) == 0.0  # mean of 100·cos is negative
    np.testing.assert_allclose(pair_scores(a, a), [100.0, 100.0])
    with pytest.raises(ValueError, match="must be equal"):
        pair_scores(a, b[:1])
