"""The embedded model's data set: Animal-MNIST, read from the installed ``animal-mnist`` package.

``animal-mnist`` 0.4 (MIT, PyPI) ships 10,000 real 28×28 grayscale animal silhouettes in 10
balanced classes (1,000 each) as two gzip'd pickles inside its wheel. Its own loader imports
TensorFlow (for MNIST, which it does not need for these files), so we read the files directly —
with :class:`NumpyOnlyUnpickler`, which admits exactly the globals a pickled numpy array needs and
refuses every other one (unpickling is code execution). Nothing is downloaded at run time:
install the package with ``pip install --no-deps animal-mnist==0.4`` (``--no-deps`` skips its
TensorFlow, pandas and scikit-learn requirements, which reading the files does not need).
"""

from __future__ import annotations

import gzip
import importlib.resources
import io
import pickle

import numpy as np

#: Class names in label order (from the package's description).
CLASS_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28
PACKAGE = "animal_mnist"
DATA_FILE = "data/Animal_MNIST/animal_data_version_3.gz"
LABEL_FILE = "data/Animal_MNIST/animal_label_version_3.gz"

# What a pickled numpy array refers to, and nothing else.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and refuses every other global."""

    def find_class(self, module, name):
        """The numpy global ``module.name`` if it is allowed; anything else raises UnpicklingError."""
        if (module, name) in _ALLOWED_GLOBALS:
            if module.startswith("numpy.core"):  # numpy 2 moved numpy.core to numpy._core
                module = "numpy._core.multiarray" if hasattr(np, "_core") else module
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")


def load_numpy_pickle(data: bytes) -> np.ndarray:
    """Unpickle ``data`` with :class:`NumpyOnlyUnpickler`; the result must be an ndarray."""
    obj = NumpyOnlyUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, np.ndarray):
        raise pickle.UnpicklingError(f"expected a numpy array, found {type(obj).__name__}")
    return obj


def _package_file(name: str):
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError(f"the data set package {PACKAGE!r} is not installed; "
                                f"run: pip install --no-deps animal-mnist==0.4") from None
    path = root.joinpath(name)
    if not path.is_file():
        raise FileNotFoundError(f"{PACKAGE} is installed but has no {name} (expected version 0.4)")
    return path


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [10000, 28, 28], labels int32 [10000])`` from the installed package."""
    images = load_numpy_pickle(gzip.decompress(_package_file(DATA_FILE).read_bytes()))
    labels = load_numpy_pickle(gzip.decompress(_package_file(LABEL_FILE).read_bytes()))
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(f"unexpected Animal-MNIST arrays: images {images.shape} {images.dtype}, labels {labels.shape}")
    return images, labels.astype(np.int32)


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 28, 28, 1]`` in ``[-1, 1]`` (the diffusion model's pixels)."""
    return (np.asarray(images, np.float32)[..., None] / 127.5 - 1.0).astype(np.float32)


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """Model-range samples ``[..., 28, 28, C]`` in ``[-1, 1]`` -> uint8 images (clipped)."""
    return np.clip(np.round((np.asarray(samples, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def split(labels: np.ndarray, test_per_class: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, class-balanced split: ``(train indices, test indices)`` with ``test_per_class`` per class."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test.append(rng.choice(idx, size=test_per_class, replace=False))
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test
