"""The model wrapper every family shares: an NNX module used functionally, its config, and I/O.

**The family interface.** Each family is a module listed in :data:`FAMILIES` (``dit`` ->
``jdq.models.dit``, ``pixart``, ``sd3`` -> ``jdq.models.mmdit``, ``vae``) that exposes

* ``FAMILY``: its name (the ``"family"`` written into a converted folder's ``config.json``);
* ``Config``: a frozen dataclass deriving from :class:`ConfigBase` (``to_dict``/``from_dict``);
* ``build(config, rngs) -> nnx.Module``: the module, whose ``__call__(*inputs, quant=None)`` is
  the forward pass (``quant``: ``None`` or a :class:`jdq.quant.QuantizerBase`). Every matmul in
  it goes through ``jdq.models.layers`` (``qlinear``/``qmatmul``/``attention``), with a site
  equal to the :class:`~jdq.models.layers.Linear`'s path in the module tree;
* ``from_config(config, key=None, abstract=False) -> Model``: ``Model.create(config, build, key)``
  (random params from ``key``) or, with ``abstract=True``, ``Model.abstract(config, build)``
  (``jax.ShapeDtypeStruct`` params, nothing allocated).

**Functional use.** :class:`Model` splits the module once into a static graph definition and a
params pytree (a plain nested ``dict``; list indices are ``int`` keys). ``model.apply(params,
*inputs, quant=None)`` is a pure, jit-able function of ``params`` (``nnx.merge`` inside), so
``jax.jit``, ``jax.vmap`` and ``jax.grad`` treat a model like any function of arrays.
``model(*inputs, quant=None)`` calls it with the model's own params under ``jax.jit`` (the
quantizer, a pytree, is an argument, so a new state does not recompile). A ``quant`` that is not
a pytree (a statistics collector, an operand recorder) runs un-jitted, inside the caller's trace.

**On disk.** A converted model is a folder with ``config.json`` (``{"family": ..., "jdq_format":
1, **config}``) and ``params.safetensors`` (params flattened with dotted names, e.g.
``blocks.3.attn.qkv.kernel``). :func:`save` writes it atomically; :func:`load` checks every
tensor's name and shape against the family's abstract model.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import numbers
import os
import secrets
import shutil
import socket
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdq.tree import flatten_params, key_name

#: Family name -> module implementing the family interface.
FAMILIES = {
    "dit": "jdq.models.dit",
    "pixart": "jdq.models.pixart",
    "sd3": "jdq.models.mmdit",
    "vae": "jdq.models.vae",
    "inception": "jdq.models.inception",  # the FID Inception-v3 (a feature extractor, not a denoiser)
    "t5": "jdq.models.t5",  # text encoders (transformers' T5EncoderModel, CLIP text/vision towers)
    "clip": "jdq.models.clip",
}
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"

Params = dict


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _is_tuple_type(tp) -> bool:
    if tp is tuple or typing.get_origin(tp) is tuple:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_tuple_type(a) for a in typing.get_args(tp))
    return False


_SCALAR_CHECKS = {
    int: (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)), "an integer"),
    float: (lambda v: isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and np.isfinite(v),
            "a finite number"),
    bool: (lambda v: isinstance(v, (bool, np.bool_)), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _scalar_kinds(tp):
    """The scalar types (int/float/bool/str, None) a field annotation allows, or None if it is not only scalars."""
    if tp in _SCALAR_CHECKS or tp is type(None):
        return (tp,)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [_scalar_kinds(a) for a in typing.get_args(tp)]
        return None if any(p is None for p in parts) else tuple(k for p in parts for k in p)
    return None


@functools.lru_cache(maxsize=None)
def _field_hints(cls) -> dict:
    """``cls``'s resolved annotations; {} if one cannot be resolved (such a config is simply not checked)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError, AttributeError):
        return {}


def check_field_types(config) -> None:
    """Raise ValueError naming the field if a scalar field (int/float/bool/str) holds another type
    (or a float field NaN or Inf).

    A config read from JSON (``"num_heads": "2"``) otherwise fails later with an obscure TypeError,
    or, worse, computes with the wrong value (``"2" * 64`` is a string). Fields of other types
    (tuples, nested values) are not checked here.
    """
    cls = type(config)
    hints = _field_hints(cls)
    for f in dataclasses.fields(config):
        kinds = _scalar_kinds(hints.get(f.name))
        if kinds is None:
            continue
        v = getattr(config, f.name)
        if v is None and type(None) in kinds:
            continue
        if not any(_SCALAR_CHECKS[k][0](v) for k in kinds if k in _SCALAR_CHECKS):
            want = " or ".join(_SCALAR_CHECKS[k][1] for k in kinds if k in _SCALAR_CHECKS)
            raise ValueError(f"{cls.__module__}.{cls.__qualname__}: field {f.name!r} must be {want}, "
                             f"got {v!r} ({type(v).__name__})")


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Base of family configs: frozen dataclasses that round-trip through JSON-able dicts.

    Every subclass's scalar fields are type-checked (:func:`check_field_types`) before its own
    ``__post_init__`` runs.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None:  # inherits a parent's (already checking) __post_init__, or ConfigBase's
            return

        def __post_init__(self):
            check_field_types(self)
            own(self)

        cls.__post_init__ = __post_init__

    def __post_init__(self):
        check_field_types(self)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Build a config from a dict; unknown keys are an error naming them (``family``/``jdq_format`` are ignored)."""
        d = {k: v for k, v in d.items() if k not in ("family", "jdq_format")}
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"{cls.__module__}.{cls.__qualname__}: unknown config key(s) {unknown}; "
                             f"known: {sorted(fields)}")
        kwargs = {}
        for k, v in d.items():
            if isinstance(v, list) and _is_tuple_type(hints.get(k)):
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            kwargs[k] = v
        return cls(**kwargs)

    def replace(self, **changes):
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def family_module(family: str) -> types.ModuleType:
    """The module implementing ``family`` (imported on first use)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[family])


def family_of(config: ConfigBase) -> str:
    """The family name of a config object (its module's ``FAMILY``)."""
    mod = importlib.import_module(type(config).__module__)
    family = getattr(mod, "FAMILY", None)
    if family is None:
        raise TypeError(f"{type(config).__qualname__} is not a config of a jdq model family")
    return family


# --------------------------------------------------------------------------------------------
# Params helpers
# --------------------------------------------------------------------------------------------


def unflatten_params(flat: Mapping[str, Any], like) -> Params:
    """Nest dotted names into the structure of ``like`` (a params pytree or its abstract shapes).

    Every name of ``like`` must be present in ``flat`` with the same shape, and ``flat`` must have
    no other names; the error lists the missing/unexpected names or the name and both shapes.
    """
    expected = flatten_params(like)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise KeyError(f"params do not match the model: missing {missing[:10]}"
                       f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected "
                       f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)})")
    for name, ref in expected.items():
        if tuple(np.shape(flat[name])) != tuple(ref.shape):
            raise ValueError(f"param {name!r}: expected shape {tuple(ref.shape)}, found {tuple(np.shape(flat[name]))}")
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[".".join(key_name(k) for k in p)] for p, _ in paths])


def count_params(params) -> int:
    """Total number of parameter elements (works on abstract ``ShapeDtypeStruct`` trees too)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(params)))


def cast_floating(params, dtype):
    """Cast the floating leaves of ``params`` to ``dtype`` (integer leaves untouched)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


class _ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` in an abstract build, where no random value is ever computed.

    Under ``nnx.eval_shape`` each ``nnx.Rngs`` draw updates a traced counter, and flax 0.12 then
    inspects the tracer at a cost that grows with the trace: quadratic in the number of layers
    (SD3-medium: 29 s abstractly with ``nnx.Rngs``, 1.6 s with this).
    """

    def params(self):
        return jax.random.key(0)

    def __call__(self):
        return jax.random.key(0)


def abstract_module(config, build):
    """``build(config, rngs)`` under ``nnx.eval_shape``: ``ShapeDtypeStruct`` params, no FLOPs."""
    return nnx.eval_shape(lambda: build(config, _ShapeOnlyRngs()))


def random_params(abstract, key: jax.Array | int | None = None):
    """Random params with the shapes/dtypes of ``abstract``, generated with numpy (no XLA compile).

    By leaf name: ``kernel`` ~ N(0, 1/fan_in) (fan_in: all axes but the last), ``scale`` = 1,
    everything else (biases, tables) ~ N(0, 0.02²). Random models serve tests and benchmarks;
    the papers' training initialisations (adaLN-Zero zeros) would make outputs trivial. (Eager
    or jitted ``jax.random`` init of a model compiles slowly on CPU, a minute for a tiny VAE.)
    """
    if key is None:
        seed = 0
    elif isinstance(key, (int, np.integer)):
        seed = int(key)
    else:
        seed = int(np.asarray(jax.random.key_data(key)).astype(np.uint64).sum())
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = key_name(path[-1]) if path else ""
        if name == "scale":
            a = np.ones(x.shape, np.float32)
        elif name == "kernel":
            fan_in = int(np.prod(x.shape[:-1])) or 1
            a = rng.standard_normal(x.shape, np.float32) / np.float32(np.sqrt(fan_in))
        else:
            a = rng.standard_normal(x.shape, np.float32) * np.float32(0.02)
        return jnp.asarray(a, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(x.shape, x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _is_pytree(x) -> bool:
    """Whether ``x`` is a registered pytree node (e.g. a Quantizer), not an opaque leaf."""
    return not jax.tree_util.all_leaves([x])


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class Model:
    """An NNX module split once into ``graphdef`` + ``params``, used as a pure function.

    ``family``: ``"dit"``, ``"pixart"``, ``"sd3"`` or ``"vae"``; ``config``: the family's frozen
    config; ``params``: a nested dict of arrays. See the module docstring for the interface.
    """

    def __init__(self, config: ConfigBase, graphdef: nnx.GraphDef, params: Params):
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self._jitted: dict[str, Callable] = {}

    @classmethod
    def create(cls, config: ConfigBase, build: Callable[[ConfigBase, nnx.Rngs], nnx.Module],
               key: jax.Array | int | None = None) -> "Model":
        """Build ``build(config, rngs)`` with :func:`random_params` from ``key`` (an int seed or a PRNG key)."""
        graphdef, state = nnx.split(abstract_module(config, build))
        return cls(config, graphdef, random_params(nnx.to_pure_dict(state), key))

    @classmethod
    def abstract(cls, config: ConfigBase, build: Callable[[ConfigBase, nnx.Rngs], nnx.Module]) -> "Model":
        """The model with ``jax.ShapeDtypeStruct`` params: no memory, no FLOPs (shapes, counts, tracing)."""
        graphdef, state = nnx.split(abstract_module(config, build))
        return cls(config, graphdef, nnx.to_pure_dict(state))

    @property
    def family(self) -> str:
        """The family name (``"dit"``, ``"pixart"``, ``"sd3"``, ``"vae"``)."""
        return family_of(self.config)

    @property
    def num_params(self) -> int:
        """Number of parameter elements."""
        return count_params(self.params)

    def module(self, params: Params | None = None) -> nnx.Module:
        """The NNX module with ``params`` (default: the model's own) merged in."""
        return nnx.merge(self.graphdef, self.params if params is None else params)

    def apply(self, params: Params, *inputs, quant=None, method: str = "__call__", **kwargs):
        """Pure forward pass: ``module(params).<method>(*inputs, quant=quant, **kwargs)``; jit-able."""
        module = nnx.merge(self.graphdef, params)
        return getattr(module, method)(*inputs, quant=quant, **kwargs)

    def call(self, method: str, *inputs, quant=None, **kwargs):
        """Run ``method`` with the model's params, under ``jax.jit``.

        Array keyword arguments are traced; other keyword arguments are static (hashable).
        """
        if quant is not None and not _is_pytree(quant):
            return self.apply(self.params, *inputs, quant=quant, method=method, **kwargs)
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
        static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
        cache_key = (method, static)
        fn = self._jitted.get(cache_key)
        if fn is None:
            def fn(params, inputs, arrays, quant):
                return self.apply(params, *inputs, quant=quant, method=method, **dict(static), **arrays)

            fn = self._jitted[cache_key] = jax.jit(fn)
        return fn(self.params, inputs, arrays, quant)

    def __call__(self, *inputs, quant=None, **kwargs):
        """The forward pass with the model's own params, jitted."""
        return self.call("__call__", *inputs, quant=quant, **kwargs)

    def replace(self, params: Params | None = None, config: ConfigBase | None = None) -> "Model":
        """The model with new ``params`` and/or ``config`` (a new config rebuilds the graph, abstractly).

        The params must fit the new config (same names and shapes); use it for settings that do
        not change shapes, e.g. ``model.replace(config=cfg.replace(dtype="bfloat16"))``.
        """
        graphdef = self.graphdef
        params = self.params if params is None else params
        if config is not None and config != self.config:
            build = family_module(family_of(config)).build
            graphdef, abstract = nnx.split(abstract_module(config, build))
            unflatten_params(flatten_params(params), nnx.to_pure_dict(abstract))  # names and shapes fit
        return type(self)(self.config if config is None else config, graphdef, params)

    def with_dtype(self, dtype) -> "Model":
        """The model computing in ``dtype`` (config ``dtype``) with its floating params cast to it."""
        name = jnp.dtype(dtype).name
        return self.replace(config=self.config.replace(dtype=name)).astype(dtype)

    def astype(self, dtype) -> "Model":
        """The model with its floating params cast to ``dtype`` (e.g. bfloat16 weights for speed)."""
        return self.replace(params=cast_floating(self.params, dtype))

    def __repr__(self):
        return f"{type(self).__name__}({self.config!r}, {self.num_params:,} params)"


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a jdq model folder: a folder whose ``config.json`` is an object naming a family."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        raw = json.loads(p.read_text())
    except (ValueError, OSError):
        return False
    return isinstance(raw, dict) and raw.get("family") in FAMILIES and "jdq_format" in raw


_HOST = socket.gethostname().replace("-", "_") or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or a number we cannot ask about): leave its folder alone
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``out``'s hidden ``.NAME.tmp-HOST-PID-*`` / ``.NAME.old-…`` siblings left by dead processes.

    A conversion killed by SIGKILL (or a power cut) cannot clean up after itself; the next write
    of the same folder does. Only folders made on this host by a process that no longer exists
    are removed (a live conversion's temporary folder is never touched). Folders named the older
    way (``.NAME.tmp-XXXXXXXX``, no host or PID) cannot be told apart from a live write and are
    left for the user to delete. Returns what was removed.
    """
    removed = []
    for kind in ("tmp", "old"):
        for d in out.parent.glob(f".{glob_escape(out.name)}.{kind}-{_HOST}-*"):
            pid = d.name[len(f".{out.name}.{kind}-{_HOST}-"):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _make_sibling(out: Path, kind: str) -> Path:
    """A new hidden folder ``.NAME.KIND-HOST-PID-RANDOM`` next to ``out``, mode 0o777 minus the umask."""
    for _ in range(100):
        d = out.parent / f".{out.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(d, 0o777)  # the umask applies (tempfile.mkdtemp would make it 0o700)
        except FileExistsError:
            continue
        return d
    raise FileExistsError(f"cannot create a temporary folder next to {out}")  # pragma: no cover


def _default_file_mode(folder: Path) -> int:
    """0o666 minus the process umask, read off a probe file (``os.umask`` would change process state)."""
    probe = folder / f".mode-probe-{secrets.token_hex(4)}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def check_replaceable(out: str | os.PathLike, overwrite: bool, protect=(), replaceable=None) -> None:
    """Raise unless writing the model folder ``out`` may go ahead (``overwrite``: replace an existing one).

    An existing ``out`` is replaced only if ``overwrite`` and it is a jdq model folder
    (``replaceable(out)``, default :func:`is_model_folder`) that neither is nor contains any path
    in ``protect`` (e.g. the source of a conversion): ``--overwrite`` never deletes unrelated files.
    """
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace a jdq model folder)")
    real = out.resolve()
    for p in protect:
        src = Path(p).resolve()
        if src == real or real in src.parents:
            raise FileExistsError(f"refusing to overwrite {out}: it {'is' if src == real else 'contains'} "
                                  f"the source {p}")
    if not (replaceable or is_model_folder)(out):
        raise FileExistsError(f"refusing to overwrite {out}: it is not a jdq model folder (no {CONFIG_FILE} "
                              f"naming a jdq family); remove it yourself or choose another output folder")


def write_folder_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False,
                            protect=(), replaceable=None) -> Path:
    """Run ``write(tmp_dir)`` in a temporary sibling folder, then rename it to ``out_dir``.

    Nothing appears at ``out_dir`` unless ``write`` succeeds. An existing ``out_dir`` is an error
    unless ``overwrite`` and it is a jdq model folder not holding a ``protect`` path (see
    :func:`check_replaceable`); then it is replaced only after the new folder is complete. The
    folder gets mode 0o777 minus the umask (0755 under the usual 022), its files 0o666 minus the
    umask. Stale temporary siblings of dead processes are removed first
    (:func:`remove_stale_temporaries`).
    """
    out = Path(out_dir)
    check_replaceable(out, overwrite, protect, replaceable)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = _make_sibling(out, "tmp")
    try:
        write(tmp)
        if out.exists():
            old = _make_sibling(out, "old")
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_params(path: str | os.PathLike, params, family: str, config: Any,
                overwrite: bool = False, protect=()) -> Path:
    """Write ``params`` and ``config`` as a jdq model folder (atomically); returns the folder.

    ``overwrite`` replaces an existing jdq model folder only (see :func:`check_replaceable`).
    """
    from safetensors.numpy import save_file

    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten_params(params).items()}

    def write(tmp: Path):
        save_file(flat, str(tmp / PARAMS_FILE), metadata={"family": family, "jdq_format": str(FORMAT_VERSION)})
        (tmp / CONFIG_FILE).write_text(json.dumps({"family": family, "jdq_format": FORMAT_VERSION, **cfg}, indent=2) + "\n")
        os.chmod(tmp / PARAMS_FILE, _default_file_mode(tmp))  # safetensors creates its file 0o600

    return write_folder_atomically(path, write, overwrite=overwrite, protect=protect)


def save(model: Model, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` as a jdq model folder loadable with :func:`load` (atomically)."""
    return save_params(path, model.params, model.family, model.config, overwrite=overwrite)


def read_config(path: str | os.PathLike) -> tuple[str, ConfigBase]:
    """``(family, config)`` from a jdq model folder's ``config.json``."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{path} is not a jdq model folder: no {CONFIG_FILE}")
    try:
        raw = json.loads(p.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{p}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: expected a JSON object of config fields, found a JSON {type(raw).__name__}")
    if "family" not in raw:
        raise ValueError(f"{p}: no 'family' key (expected one of {sorted(FAMILIES)})")
    version = raw.get("jdq_format", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"{p}: jdq_format {version} is not supported (this jdq reads {FORMAT_VERSION})")
    try:
        mod = family_module(raw["family"])
        return raw["family"], mod.Config.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: {e}") from None


def load(path: str | os.PathLike, dtype=None) -> tuple[Model, ConfigBase]:
    """``(model, config)`` from a converted folder (``config.json`` + ``params.safetensors``).

    Every tensor is checked by name and shape against the family's abstract model, and by value
    (:func:`check_param_values`: floating, one floating dtype for all, no NaN or Inf), so a damaged
    folder fails here, naming the tensor, rather than sampling NaN or calibrating on it. ``dtype``
    (e.g. ``jnp.bfloat16``) casts the floating params after loading.
    """
    from jdq.models.streaming import SafetensorsReader

    family, config = read_config(path)
    mod = family_module(family)
    p = Path(path) / PARAMS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no {PARAMS_FILE}")
    try:  # tensor by tensor, each numpy buffer dropped once on the device: never two copies of a model
        reader = SafetensorsReader(p)
        flat = {k: jnp.asarray(reader[k]) for k in reader.keys()}
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None
    check_param_values(flat, p)
    abstract = mod.from_config(config, abstract=True)
    params = unflatten_params(flat, abstract.params)
    model = abstract.replace(params=params)
    if dtype is not None:
        model = model.astype(dtype)
    return model, config


def check_param_values(flat: Mapping[str, Any], where) -> None:
    """Raise ValueError naming the tensor unless every tensor is floating, of one dtype, and finite.

    ``flat``: ``{dotted name: numpy array}`` as read from ``where`` (named in the message). A model
    folder's params are all floating (integer or complex tensors mean a damaged or foreign file)
    and share the dtype they were saved in (float32, or the ``--dtype`` of ``jdq convert``).
    """
    dtypes: dict[str, list[str]] = {}
    for name, a in flat.items():
        dt = np.dtype(a.dtype)
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"{where}: tensor {name!r} has dtype {dt.name}; model params must be floating "
                             f"(float32, bfloat16 or float16)")
        dtypes.setdefault(dt.name, []).append(name)
    if len(dtypes) > 1:
        common = max(dtypes, key=lambda k: len(dtypes[k]))
        odd = sorted((n, k) for k, names in dtypes.items() if k != common for n in names)
        raise ValueError(f"{where}: tensors of mixed dtypes: {len(dtypes[common])} are {common} but "
                         f"{', '.join(f'{n!r} is {k}' for n, k in odd[:5])}{' ...' if len(odd) > 5 else ''}")
    for name, a in flat.items():
        finite = np.isfinite(np.asarray(a, np.float32) if np.dtype(a.dtype).itemsize < 4 else a)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise ValueError(f"{where}: tensor {name!r} has {bad} NaN or Inf value(s) of {finite.size}; "
                             f"the weights are damaged (re-convert or re-train the model)")
