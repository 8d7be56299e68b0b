"""Named evaluation protocols (``jdq eval --protocol NAME``): what to sample and which metrics to report.

``animal-mnist`` — the embedded Animal-MNIST DiT on the CPU: 1,000 samples, the 10 classes in
turn (every contiguous block of 10 holds each class once, so the jackknife groups are balanced),
DDIM with ``ANIMAL_STEPS`` steps (η = 0), guidance ``ANIMAL_GUIDANCE``, seed 0; Animal-FID
(:mod:`jdq.demo.animal_fid`) with precision and recall, class agreement, and — for a quantized
model — PSNR / SSIM / mean |Δ| against the FP model's images of the same noise.

The guidance is where the FP model's Animal-FID is lowest (``benchmarks/quality.py --sweep``;
the numbers are in ``benchmarks/RESULTS.md``): strong guidance trades diversity for fidelity, so
at guidance 4 (the embedded model's display default) FID rewards a quantized model that loses
diversity and does not rank quantization damage; at the FID-optimal guidance both kinds of
damage raise it, and precision / recall show which kind it is.

``dit-imagenet256`` — the DiT / PTQ4DiT / Q-DiT protocol: 10 samples per class (10,000 for
ImageNet's 1,000 classes), classifier-free guidance 1.5, DDPM 250 steps (``--sampler ddim --steps
50`` for Q-DiT's), seed 0; FID, sFID, IS (ADM's split size 5,000), precision and recall on the FID
Inception-v3 (``--inception`` a converted folder) against the ADM reference batch
(``--reference VIRTUAL_imagenet256_labeled.npz``), latents decoded with ``--vae``.
"""

from __future__ import annotations

import dataclasses

#: The Animal-MNIST protocol's sampler settings (see the module docstring for the choice).
ANIMAL_STEPS = 15
ANIMAL_GUIDANCE = 1.5


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What a protocol samples (counts, sampler, guidance, seed) and reports (features, metrics)."""

    name: str
    description: str
    sampler: str
    steps: int
    guidance: float
    features: str  # "animal" (the embedded classifier) or "inception"
    metrics: tuple[str, ...]
    samples: int | None = None  # None: per_class × the model's classes
    per_class: int | None = None
    seed: int = 0
    is_split_size: int | None = None

    def num_samples(self, num_classes: int) -> int:
        """The protocol's sample count for a model with ``num_classes`` classes."""
        return self.samples if self.samples is not None else self.per_class * num_classes


PROTOCOLS = {
    "animal-mnist": Protocol(
        "animal-mnist", "the embedded Animal-MNIST DiT: Animal-FID, precision/recall, agreement (CPU)",
        sampler="ddim", steps=ANIMAL_STEPS, guidance=ANIMAL_GUIDANCE, features="animal",
        metrics=("fid", "precision", "recall", "agreement"), samples=1000),
    "dit-imagenet256": Protocol(
        "dit-imagenet256", "DiT-XL/2 256×256 (DiT, PTQ4DiT, Q-DiT): 10 per class, cfg 1.5, ADM reference batch",
        sampler="ddpm", steps=250, guidance=1.5, features="inception",
        metrics=("fid", "sfid", "is", "precision", "recall"), per_class=10, is_split_size=5000),
}


def get(name: str) -> Protocol:
    """The protocol called ``name``; an unknown name raises a ValueError listing the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}") from None
