"""Loading the reference implementations without their package imports (torchvision is absent here).

torch-fidelity's ``__init__`` imports torchvision (a CUDA wheel on PyPI that does not load beside
the CPU torch), and pytorch-fid's ``fid_score`` imports ``torchvision.transforms`` and its own
``inception`` module; the functions we compare with need neither. Each loader executes only the
module files it needs under a private package name registered in ``sys.modules`` for the duration
of the import (then removed again), so nothing of the installed package's ``__init__`` runs and
no global state is left behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"reference package {name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _modules(entries: dict):
    saved = {k: sys.modules.get(k) for k in entries}
    sys.modules.update(entries)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _exec(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def torch_fidelity(*modules: str) -> dict:
    """``{name: module}`` for torch-fidelity's ``modules`` (e.g. ``"feature_extractor_inceptionv3"``)."""
    pytest.importorskip("torch")
    root = _package_dir("torch_fidelity")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = [str(root)]  # submodules import as usual, the package __init__ never runs
    # the metric modules import data-set and caching helpers from utils (which imports torchvision);
    # the *_features_to_metric functions compared here never call them
    utils = types.ModuleType("torch_fidelity.utils")

    def _unavailable(name):
        def fail(*args, **kwargs):
            raise RuntimeError(f"torch_fidelity.utils.{name} is stubbed out in the tests")
        return fail

    utils.__getattr__ = _unavailable
    names = [f"torch_fidelity.{m}" for m in modules]
    with _modules({"torch_fidelity": pkg, "torch_fidelity.utils": utils}):
        loaded = {}
        try:
            for m in modules:
                loaded[m] = importlib.import_module(f"torch_fidelity.{m}")
        finally:
            for k in list(sys.modules):
                if k.startswith("torch_fidelity.") and k not in names:
                    sys.modules.pop(k, None)
            for k in names:
                sys.modules.pop(k, None)
    return loaded


def pytorch_fid_frechet_distance():
    """pytorch-fid's ``calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6)``."""
    pytest.importorskip("torch")
    root = _package_dir("pytorch_fid")
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.__path__ = []
    inception = types.ModuleType("pytorch_fid.inception")
    inception.InceptionV3 = types.SimpleNamespace(BLOCK_INDEX_BY_DIM={2048: 3})  # read by its argparse setup
    pkg = types.ModuleType("pytorch_fid")
    pkg.__path__ = [str(root)]
    with _modules({"torchvision": tv, "torchvision.transforms": tv.transforms, "pytorch_fid": pkg,
                   "pytorch_fid.inception": inception}):
        try:
            module = _exec("pytorch_fid.fid_score", root / "fid_score.py")
        finally:
            sys.modules.pop("pytorch_fid.fid_score", None)
    import warnings

    from scipy import linalg

    def sqrtm(a, disp=True):
        # pytorch-fid 0.3.0 unpacks sqrtm(..., disp=False) as (root, error); SciPy 1.17 deprecates disp= and
        # returns the root alone for 1×1 input: give it the pair it expects, the root computed by SciPy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            out = linalg.sqrtm(a, disp=disp)
        return out if disp or isinstance(out, tuple) else (out, 0.0)

    module.linalg = types.SimpleNamespace(sqrtm=sqrtm)
    return module.calculate_frechet_distance
