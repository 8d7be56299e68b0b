"""Animal-MNIST loading: the numpy-only unpickler and the installed package's files."""

import io
import os
import pickle

import numpy as np
import pytest

from jdq.demo import data


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unpickler_loads_numpy_arrays():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = data.load_numpy_pickle(pickle.dumps(arr, protocol=4))
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == np.uint8


@pytest.mark.parametrize("obj, message", [
    (_Evil(), "refusing to load global"),
    (np.float64, "refusing to load global numpy.float64"),
    ({"a": 1}, "expected a numpy array, found dict"),
])
def test_unpickler_refuses_everything_else(obj, message):
    with pytest.raises(pickle.UnpicklingError, match=message):
        data.load_numpy_pickle(pickle.dumps(obj, protocol=4))


def test_unpickler_refuses_a_global_hidden_inside_an_array_pickle():
    payload = pickle.dumps([np.zeros(2), _Evil()], protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        data.NumpyOnlyUnpickler(io.BytesIO(payload)).load()


def test_pixel_range_round_trip():
    img = np.array([[0, 128, 255]], np.uint8)
    x = data.to_model_range(img)
    assert x.shape == (1, 3, 1) and x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(data.to_uint8(x)[..., 0], img)


def test_split_is_balanced_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 50)
    train, test = data.split(labels, test_per_class=5, seed=3)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 500
    assert np.all(np.bincount(labels[test]) == 5)
    np.testing.assert_array_equal(test, data.split(labels, test_per_class=5, seed=3)[1])


def test_installed_animal_mnist():
    pytest.importorskip("animal_mnist", reason="pip install --no-deps animal-mnist==0.4")
    images, labels = data.load_animal_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))
    assert 0.2 < (images > 127).mean() < 0.6  # silhouettes: white shapes on black
