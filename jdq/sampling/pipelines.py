"""Text-to-image pipelines: prompts -> text encoders -> the transformer's sampler -> VAE decode.

A *pipeline folder* is what ``jdq convert`` writes from a diffusers ``PixArtSigmaPipeline`` or
``StableDiffusion3Pipeline`` folder (:mod:`checkpoints_convert.pipelines`): ``pipeline.json``
(``{"kind": "pixart" | "sd3", "max_sequence_length": N}``), ``sampling.json`` (the scheduler's
defaults for ``jdq sample``), jdq model folders ``transformer``, ``vae``, ``text_encoder``
(PixArt-Σ: T5; SD3: CLIP-L) and, for SD3, ``text_encoder_2`` (CLIP-G) and ``text_encoder_3``
(T5), and the tokenizer folders beside them, copied unchanged.

The conditions are built as diffusers' pipelines build them:

* PixArt-Σ: T5 on ``max_sequence_length`` (300) padded tokens with their attention mask; the
  transformer gets the last hidden state and the mask.
* SD3: each CLIP on 77 tokens *without* a mask; their penultimate hidden states are
  concatenated along features and zero-padded to the T5 width, then concatenated along tokens
  with T5's last hidden state on 256 tokens (no mask); ``pooled`` is the two CLIPs' projected
  EOS embeddings, concatenated.

Negative prompts default to ``""`` when guidance is on, as in diffusers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

PIPELINE_FILE = "pipeline.json"
KINDS = ("pixart", "sd3")


class PipelineError(ValueError):
    """A pipeline folder that is incomplete or whose parts do not fit together."""


def is_pipeline_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a converted text-to-image pipeline folder (has ``pipeline.json``)."""
    return (Path(folder) / PIPELINE_FILE).is_file()


@dataclasses.dataclass
class TextToImage:
    """A loaded pipeline: the transformer, the VAE, the text encoders and their tokenizers."""

    kind: str
    transformer: Any
    vae: Any
    encoders: list
    tokenizers: list
    max_sequence_length: int
    defaults: dict
    encoder_quant: list | None = None  # one quantizer (or None) per text encoder; see jdq.recipes.encoder_quantizers

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "TextToImage":
        """Load a pipeline folder; errors name the missing part or the mismatched widths."""
        from jdq.models import load
        from jdq.models.tokenizers import load_tokenizer

        d = Path(folder)
        try:
            meta = json.loads((d / PIPELINE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PipelineError(f"{d}: cannot read {PIPELINE_FILE} ({e})") from None
        kind = meta.get("kind")
        if kind not in KINDS:
            raise PipelineError(f"{d / PIPELINE_FILE}: kind {kind!r}; expected one of {KINDS}")
        names = ["text_encoder"] if kind == "pixart" else ["text_encoder", "text_encoder_2", "text_encoder_3"]
        tok_kinds = ["t5"] if kind == "pixart" else ["clip", "clip", "t5"]

        def part(name):
            if not (d / name).is_dir():
                raise PipelineError(f"{d}: the pipeline lacks its {name} folder")
            try:
                return load(d / name)[0]
            except (FileNotFoundError, ValueError, KeyError) as e:
                raise PipelineError(f"{d / name}: {e}") from None

        transformer, vae = part("transformer"), part("vae")
        encoders = [part(n) for n in names]
        tokenizers = [load_tokenizer(d / n.replace("text_encoder", "tokenizer"), k) for n, k in zip(names, tok_kinds)]
        defaults = {}
        if (d / "sampling.json").is_file():
            defaults = json.loads((d / "sampling.json").read_text())
        pipe = cls(kind, transformer, vae, encoders, tokenizers,
                   int(meta.get("max_sequence_length", 300 if kind == "pixart" else 256)), defaults)
        pipe.check()
        return pipe

    def check(self):
        """The encoders' widths fit the transformer's text inputs (else :class:`PipelineError`)."""
        from jdq.models import clip, mmdit, pixart, t5

        tc = self.transformer.config
        if self.kind == "pixart":
            if not isinstance(tc, pixart.Config) or not isinstance(self.encoders[0].config, t5.Config):
                raise PipelineError("a PixArt-Σ pipeline needs a pixart transformer and a T5 text_encoder")
            want = tc.caption_channels or tc.cross_attention_dim
            if self.encoders[0].config.d_model != want:
                raise PipelineError(f"text_encoder width {self.encoders[0].config.d_model} does not match the "
                                    f"transformer's caption projection input {want}")
            return
        if not isinstance(tc, mmdit.Config) or [type(e.config) for e in self.encoders] != [clip.Config, clip.Config, t5.Config]:
            raise PipelineError("an SD3 pipeline needs an sd3 transformer, two CLIP text encoders and a T5")
        clip_l, clip_g, t5 = (e.config for e in self.encoders)
        if t5.d_model != tc.joint_attention_dim:
            raise PipelineError(f"text_encoder_3 (T5) width {t5.d_model} does not match the transformer's "
                                f"joint_attention_dim {tc.joint_attention_dim}")
        if clip_l.text.hidden_size + clip_g.text.hidden_size > tc.joint_attention_dim:
            raise PipelineError(f"the CLIP widths {clip_l.text.hidden_size} + {clip_g.text.hidden_size} exceed the "
                                f"transformer's joint_attention_dim {tc.joint_attention_dim}")
        pooled = sum(c.projection_dim if c.text_projection else c.text.hidden_size for c in (clip_l, clip_g))
        if pooled != tc.pooled_projection_dim:
            raise PipelineError(f"the CLIP pooled widths add up to {pooled}, the transformer's "
                                f"pooled_projection_dim is {tc.pooled_projection_dim}")

    def token_lengths(self) -> list[int]:
        """The padded prompt length of each text encoder."""
        from jdq.models.tokenizers import prompt_length

        return [prompt_length(e, self.max_sequence_length) for e in self.encoders]

    def _quant(self, i: int):
        return None if self.encoder_quant is None else self.encoder_quant[i]

    def encode(self, prompts: list[str], what: str = "prompt") -> dict:
        """The transformer's conditions for ``prompts`` (numpy): ``text_emb`` + ``mask`` or ``pooled``."""
        from jdq.models.tokenizers import tokenize

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        lengths = self.token_lengths()
        if self.kind == "pixart":
            ids, mask = tokenize(self.tokenizers[0], prompts, lengths[0], what)
            emb = self.encoders[0](jnp.asarray(ids), jnp.asarray(mask), quant=self._quant(0))
            return {"text_emb": np.asarray(emb, np.float32), "mask": mask.astype(bool)}
        states, pooled = [], []
        for i in range(2):
            ids, _ = tokenize(self.tokenizers[i], prompts, lengths[i], what)
            out = self.encoders[i](jnp.asarray(ids), quant=self._quant(i))  # SD3 runs its CLIPs without the mask
            states.append(np.asarray(out["penultimate"], np.float32))
            pooled.append(np.asarray(out["pooled"], np.float32))
        ids, _ = tokenize(self.tokenizers[2], prompts, lengths[2], what)
        t5 = np.asarray(self.encoders[2](jnp.asarray(ids), quant=self._quant(2)), np.float32)
        clip = np.concatenate(states, axis=-1)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        return {"text_emb": np.concatenate([clip, t5], axis=1), "pooled": np.concatenate(pooled, axis=-1)}

    def generate(self, prompts: list[str], negative_prompt: str | list[str] | None = None, *,
                 guidance: float | None = None, sampler=None, steps: int | None = None, seed: int = 0,
                 batch_size: int = 16, quant=None, progress: bool = False, decode: bool = True):
        """``(latents, images or None)``: latents NHWC float32 and images in [-1, 1] (the VAE's output)."""
        from jdq.models.spec import spec_of
        from jdq.sampling.generate import generate

        fam = spec_of(self.kind).defaults
        guidance = self.defaults.get("guidance", fam["guidance"]) if guidance is None else float(guidance)
        cond = self.encode(prompts)
        uncond = None
        if guidance != 1.0:
            neg = "" if negative_prompt is None else negative_prompt
            neg = [neg] if isinstance(neg, str) else list(neg)
            if len(neg) not in (1, len(prompts)):
                raise PipelineError(f"{len(neg)} negative prompts for {len(prompts)} prompts; give 1 or {len(prompts)}")
            uncond = self.encode(neg, "negative prompt")
        latents = generate(self.transformer, cond, uncond=uncond, guidance=guidance,
                           sampler=sampler or self.defaults.get("sampler"), steps=steps or self.defaults.get("steps"),
                           shift=self.defaults.get("shift"), seed=seed, batch_size=batch_size, quant=quant,
                           progress=progress)
        if not decode:
            return latents, None
        return latents, self.decode(latents)

    def decode(self, latents, chunk: int = 4) -> np.ndarray:
        """Images in [-1, 1] (NHWC float32) from diffusion-space latents."""
        return np.concatenate([np.asarray(self.vae.decode_latents(jnp.asarray(latents[i:i + chunk])))
                               for i in range(0, len(latents), chunk)])
