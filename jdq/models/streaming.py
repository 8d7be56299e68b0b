"""safetensors files read and written one tensor at a time, so a model never exists twice in memory.

The format is a little-endian u64 header length, a JSON header (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets relative to the end of the
header) and the raw tensor bytes. :class:`SafetensorsReader` parses the header and reads a
tensor's bytes with plain file reads into a fresh numpy buffer (no memory map, so the process's
resident memory is the tensors it holds, not pages of the file it has touched);
:func:`write_safetensors` writes the header from the tensors' names, dtypes and shapes first and
then each tensor as it is produced, so a converter holds one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

#: safetensors dtype tags <-> numpy dtypes.
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_TAGS = {v: k for k, v in DTYPES.items()}


class SafetensorsReader:
    """A safetensors file's header, and its tensors read one at a time (``reader[name]``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"{self.path}: header length {n} exceeds the file size {size}; truncated?")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: the safetensors header is not JSON ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries = header
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            begin, end = e["data_offsets"]
            if self.data_start + end > size or end - begin != int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[
                    e["dtype"]].itemsize:
                raise ValueError(f"{self.path}: tensor {name!r} lies outside the file or has the wrong size; truncated?")

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of ``name``."""
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        """The stored numpy dtype of ``name``."""
        return DTYPES[self.entries[name]["dtype"]]

    def __getitem__(self, name: str) -> np.ndarray:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        out = np.empty(tuple(e["shape"]), DTYPES[e["dtype"]])
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = f.readinto(view)
        if got != end - begin:
            raise ValueError(f"{self.path}: tensor {name!r}: read {got} of {end - begin} bytes; truncated?")
        return out


def write_safetensors(path: str | os.PathLike, specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
                      produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors ``specs`` (name, dtype, shape) come from ``produce(name)``.

    ``produce`` is called once per tensor, in ``specs`` order, and its result is written and
    dropped before the next call; each result must have the declared dtype and shape.
    """
    specs = [(name, np.dtype(dt), tuple(int(s) for s in shape)) for name, dt, shape in specs]
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dt, shape in specs:
        if dt not in _TAGS:
            raise ValueError(f"write_safetensors: tensor {name!r} has dtype {dt}, which safetensors cannot store")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": _TAGS[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dt, shape in specs:
            a = np.asarray(produce(name))
            if a.dtype != dt or tuple(a.shape) != shape:
                raise ValueError(f"write_safetensors: tensor {name!r} came as {a.dtype} {tuple(a.shape)}, "
                                 f"declared {dt} {shape}")
            f.write(np.asarray(a, order="C").reshape(-1).view(np.uint8).data)
            del a
