"""Prompt tokenizers from the user's folders (transformers' tokenizer classes), padded as the pipelines pad.

* T5 (PixArt-Σ's ``tokenizer``, SD3's ``tokenizer_3``): a SentencePiece ``spiece.model`` or a
  ``tokenizer.json``; prompts padded to :data:`T5_MAX_LENGTH` tokens (PixArt-Σ: 300, SD3: 256).
* CLIP (SD3's ``tokenizer`` / ``tokenizer_2``): BPE ``vocab.json`` + ``merges.txt`` or a
  ``tokenizer.json``; 77 tokens (:data:`CLIP_MAX_LENGTH`).

:func:`tokenize` pads to ``max_length`` ("max_length" padding, as diffusers' pipelines do),
truncates longer prompts and warns, naming the dropped text, as diffusers does. jdq downloads
nothing: the files come from the folder.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

#: Token lengths the pipelines pad to.
T5_MAX_LENGTH = {"pixart": 300, "sd3": 256}
CLIP_MAX_LENGTH = 77
#: Files one of which (a tuple: all of them) a folder must have, per tokenizer kind.
REQUIRED_FILES = {"t5": (("spiece.model",), ("tokenizer.json",)),
                  "clip": (("vocab.json", "merges.txt"), ("tokenizer.json",))}


class TokenizerError(ValueError):
    """A tokenizer folder that is missing or lacks its files."""


def load_tokenizer(folder: str | os.PathLike, kind: str):
    """The transformers tokenizer of ``kind`` (``"t5"`` or ``"clip"``) in ``folder``."""
    if kind not in REQUIRED_FILES:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use 't5' or 'clip'")
    d = Path(folder)
    if not d.is_dir():
        raise TokenizerError(f"tokenizer folder {d} does not exist")
    options = REQUIRED_FILES[kind]
    if not any(all((d / f).is_file() for f in files) for files in options):
        need = " or ".join(" + ".join(files) for files in options)
        raise TokenizerError(f"{d}: not a {kind.upper()} tokenizer folder: it needs {need} "
                             f"(found {sorted(p.name for p in d.iterdir()) or 'nothing'})")
    try:
        import transformers
    except ImportError as e:
        raise TokenizerError(f"tokenizers need transformers (pip install 'jdq[torch]'): {e}") from None
    try:
        if (d / "tokenizer_config.json").is_file():
            return transformers.AutoTokenizer.from_pretrained(str(d))
        cls = transformers.T5Tokenizer if kind == "t5" else transformers.CLIPTokenizer
        return cls.from_pretrained(str(d))
    except (OSError, ValueError, TypeError) as e:
        raise TokenizerError(f"{d}: cannot load the {kind.upper()} tokenizer ({e})") from None


def tokenize(tokenizer, prompts: list[str], max_length: int, what: str = "prompt") -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int32 (N, max_length); a longer prompt is truncated with a warning."""
    if isinstance(prompts, str):
        prompts = [prompts]
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_attention_mask=True)
    full = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    for prompt, ids in zip(prompts, full):
        if len(ids) > max_length:
            dropped = tokenizer.decode(ids[max_length - 1:-1])
            warnings.warn(f"{what} {prompt[:40]!r}… has {len(ids)} tokens; only {max_length} fit, so it was "
                          f"truncated (dropped: {dropped!r})", stacklevel=2)
    return (np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32))


def prompt_length(encoder, max_sequence_length: int) -> int:
    """The padded prompt length a pipeline gives ``encoder``: 77 for CLIP, ``max_sequence_length`` for T5."""
    return CLIP_MAX_LENGTH if encoder.family == "clip" else max_sequence_length
