"""CLIP score of generated images against their prompts, as torchmetrics computes it.

For image embedding ``E_I`` and caption embedding ``E_C`` (a CLIP model's projected image and
text embeddings) the per-pair value is ``100 · cos(E_I, E_C)``; the score of a set is
``max(mean over pairs, 0)``. That is what torchmetrics' ``clip_score`` returns: its docstring
writes ``max(100 · cos, 0)`` per pair, its code clamps the mean, and jdq follows the code (the
two differ only when some pair has a negative cosine). Captions are tokenized with the CLIP
tokenizer and truncated to the text tower's length; images are preprocessed as transformers'
``CLIPImageProcessor`` does (:func:`preprocess`): the shorter side resized to ``size`` with
PIL's bicubic filter, a centre crop, ``/255`` and the per-channel mean/std normalisation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

#: OpenAI CLIP's preprocessing constants (transformers' ``OPENAI_CLIP_MEAN`` / ``_STD``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pair_scores(image_emb, text_emb) -> np.ndarray:
    """``100 · cos`` of each (image, caption) pair, float64 (N,)."""
    a, b = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"clip score: image embeddings {a.shape} and text embeddings {b.shape} must be equal (N, D)")
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 100.0 * np.sum(a * b, axis=-1)


def clip_score_from_embeddings(image_emb, text_emb) -> float:
    """``max(mean(100 · cos), 0)`` over the pairs (torchmetrics' ``clip_score``)."""
    return float(max(np.mean(pair_scores(image_emb, text_emb)), 0.0))


def preprocess(images: np.ndarray, size: int, crop: int | None = None, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """uint8 NHWC images -> CLIP pixel inputs (N, crop, crop, 3) float32, as ``CLIPImageProcessor``."""
    from PIL import Image

    crop = size if crop is None else crop
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"clip score: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    out = []
    for img in images:
        h, w = img.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        x = np.asarray(Image.fromarray(img).resize((new_w, new_h), resample=Image.BICUBIC))
        top, left = (new_h - crop) // 2, (new_w - crop) // 2
        x = x[top:top + crop, left:left + crop].astype(np.float32) * np.float32(1 / 255)
        out.append((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
    return np.stack(out)


class CLIPScorer:
    """A converted CLIP model (both towers) with its tokenizer and preprocessing: ``scorer(images, prompts)``."""

    def __init__(self, model, tokenizer, size: int, crop: int, mean=CLIP_MEAN, std=CLIP_STD):
        from jdq.models import clip

        if not isinstance(model.config, clip.Config) or model.config.text is None or model.config.vision is None:
            raise ValueError("clip score needs a CLIP model with both towers (a converted transformers CLIPModel)")
        self.model, self.tokenizer = model, tokenizer
        self.size, self.crop, self.mean, self.std = size, crop, mean, std

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "CLIPScorer":
        """From a converted ``CLIPModel`` folder holding its tokenizer files (and ``preprocessor_config.json``)."""
        from jdq.models import load
        from jdq.models.tokenizers import load_tokenizer

        model, cfg = load(folder)
        p = Path(folder) / "preprocessor_config.json"
        pre = json.loads(p.read_text()) if p.is_file() else {}
        size = pre.get("size", cfg.vision.image_size if cfg.vision else 224)
        size = size.get("shortest_edge", size) if isinstance(size, dict) else size
        crop = pre.get("crop_size", size)
        crop = crop.get("height", size) if isinstance(crop, dict) else crop
        return cls(model, load_tokenizer(folder, "clip"), int(size), int(crop), pre.get("image_mean", CLIP_MEAN),
                   pre.get("image_std", CLIP_STD))

    def embeddings(self, images: np.ndarray, prompts: list[str], batch: int = 32):
        """``(image_emb, text_emb)`` float32 for uint8 NHWC ``images`` and their ``prompts``."""
        import jax.numpy as jnp

        from jdq.models.tokenizers import tokenize

        if len(images) != len(prompts):
            raise ValueError(f"clip score: {len(images)} images but {len(prompts)} prompts")
        n = self.model.config.text.max_position_embeddings
        img, txt = [], []
        for s in range(0, len(prompts), batch):
            ids, mask = tokenize(self.tokenizer, prompts[s:s + batch], n, "caption")
            txt.append(np.asarray(self.model(jnp.asarray(ids), jnp.asarray(mask))["pooled"], np.float32))
            pix = preprocess(images[s:s + batch], self.size, self.crop, self.mean, self.std)
            img.append(np.asarray(self.model.call("encode_image", jnp.asarray(pix)), np.float32))
        return np.concatenate(img), np.concatenate(txt)

    def __call__(self, images: np.ndarray, prompts: list[str]) -> float:
        """The CLIP score of ``images`` against ``prompts``."""
        return clip_score_from_embeddings(*self.embeddings(images, prompts))
