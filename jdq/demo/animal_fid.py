"""Animal-FID: FID in the feature space of the embedded Animal-MNIST classifier, and its shipped reference.

The FID Inception sees ImageNet photographs; on 28×28 animal silhouettes its features say
little, and the embedded model is judged on the CPU. So the embedded model's FID is computed on
the penultimate layer (128 features, :func:`jdq.demo.classifier.features`) of the classifier
shipped in ``jdq/assets/animal_classifier.safetensors``, against the statistics of the 10,000
real Animal-MNIST images, computed once by ``python -m jdq.demo.animal_fid`` and shipped in
``jdq/assets/animal_fid_reference.npz``:

* ``mu`` ``[128]``, ``sigma`` ``[128, 128]`` (float64; ``np.cov`` normalisation), ``n`` (10,000);
* ``features`` ``[1000, 128]`` (float32) of a fixed class-balanced subset of 100 real images per
  class (``indices``, seed 0): precision / recall and KID need real points, and Kynkäänniemi et
  al. compare sets of equal size — 1,000 is ``jdq eval``'s default sample count (the subset keeps
  the shipped file at ~0.6 MB; the statistics use all 10,000);
* ``classifier_sha256``: the classifier file they were computed with (a mismatch is an error).

Images enter as uint8 ``[N, 28, 28, 1]`` (what ``jdq eval`` stores), mapped to ``[-1, 1]`` as the
classifier was trained (:func:`jdq.demo.data.to_model_range`), so real and generated images go
through exactly the same path. Computing the reference needs the ``animal-mnist`` package
(:mod:`jdq.demo.data`); using it does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

from jdq.demo import classifier as clf
from jdq.io import sha256_file as sha256

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLASSIFIER = ASSETS / "animal_classifier.safetensors"
REFERENCE = ASSETS / "animal_fid_reference.npz"
#: Feature name of the Animal-FID features in ``jdq eval`` shards and references.
FEATURES = "animal"
BATCH = 500
#: Real images per class whose features are shipped (precision / recall, KID).
PR_PER_CLASS = 100


@jax.jit
def _features_and_logits(params, images_uint8):
    x = images_uint8.astype(np.float32) / 127.5 - 1.0
    f = clf.features(params, x)
    return f, f @ params["head.kernel"] + params["head.bias"]


def extract(params, images: np.ndarray, batch: int = BATCH) -> dict[str, np.ndarray]:
    """``{"animal": [N, 128], "animal_logits": [N, 10]}`` of uint8 images ``[N, 28, 28, 1]`` (batched)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"Animal-FID features take uint8 images, got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (28, 28, 1):
        raise ValueError(f"Animal-FID features take images [N, 28, 28, 1], got shape {images.shape}")
    feats, logits = [], []
    for s in range(0, len(images), batch):
        chunk = images[s:s + batch]
        pad = batch - len(chunk) if len(images) > batch else 0  # one compiled shape for all full batches
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        f, lg = _features_and_logits(params, chunk)
        feats.append(np.asarray(f)[:batch - pad])
        logits.append(np.asarray(lg)[:batch - pad])
    return {FEATURES: np.concatenate(feats), f"{FEATURES}_logits": np.concatenate(logits)}


def load_reference(path=REFERENCE, classifier=CLASSIFIER):
    """The shipped reference as a :class:`jdq.metrics.Reference` (checks it matches the classifier)."""
    from jdq.metrics import GaussianStats, Reference

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"the Animal-FID reference {p} is missing; build it with `python -m jdq.demo.animal_fid`")
    with np.load(p, allow_pickle=False) as z:
        missing = [k for k in ("mu", "sigma", "n", "features", "indices", "classifier_sha256") if k not in z.files]
        if missing:
            raise ValueError(f"{p}: not an Animal-FID reference (missing {missing})")
        expected = str(z["classifier_sha256"])
        if expected != sha256(classifier):
            raise ValueError(f"{p} was computed with another classifier than {classifier}; rebuild it with "
                             f"`python -m jdq.demo.animal_fid`")
        stats = GaussianStats.from_moments(z["mu"], z["sigma"], int(z["n"]))
        name = f"animal-mnist: statistics of {int(z['n'])} real images, features of {len(z['indices'])}"
        return Reference(name, {FEATURES: stats}, {FEATURES: z["features"]})


def build_reference(out=REFERENCE, classifier=CLASSIFIER) -> Path:
    """Compute the reference from the installed ``animal-mnist`` data and write it (atomically)."""
    from jdq.demo.data import load_animal_mnist, split
    from jdq.io import atomic_write
    from jdq.metrics import GaussianStats

    images, labels = load_animal_mnist()
    feats = extract(clf.load(classifier), images[..., None])["animal"]
    stats = GaussianStats.of(feats)
    _, subset = split(labels, test_per_class=PR_PER_CLASS, seed=0)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n),
                                features=feats[subset].astype(np.float32), indices=subset.astype(np.int32),
                                classifier_sha256=np.asarray(sha256(classifier)))
    return atomic_write(out, write)


if __name__ == "__main__":
    print(f"wrote {build_reference(*sys.argv[1:2])}")
