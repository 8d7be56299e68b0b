"""Tiny T5 (SentencePiece) and CLIP (BPE) tokenizer folders built in the test, nothing downloaded."""

import json
from pathlib import Path

WORDS = ("a photo of a cat sitting on the red mat next to a small dog under blue sky with green trees and "
         "an old house by the river at night").split()


def make_t5_tokenizer(folder) -> Path:
    """A unigram SentencePiece model with T5's ids (pad 0, eos 1, unk 2) as ``folder/spiece.model``."""
    import io

    import sentencepiece as spm

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=48,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    (d / "spiece.model").write_bytes(buf.getvalue())
    return d


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_clip_tokenizer(folder) -> Path:
    """A CLIP BPE ``vocab.json`` + ``merges.txt``: every byte symbol, its word-final form, a few merges."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    merges = ["a t</w>", "c at</w>", "o f</w>", "t h", "th e</w>"]
    vocab += ["at</w>", "cat</w>", "of</w>", "th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return d
