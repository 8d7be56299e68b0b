"""Atomic file writing: write a temporary file in the target's folder, then rename it over the target.

A reader (or a crash, or Ctrl-C) never sees a half-written file: until the rename the old file
(if any) is untouched, and the rename replaces it in one step (``os.replace``, atomic on POSIX
within one file system, which a temporary file in the same folder guarantees). The temporary
file is created with the usual permissions (``0o666`` minus the process umask, as ``open``
gives), not ``tempfile.mkstemp``'s ``0o600``, keeps the target's extension (for writers that
pick a format from it) and is removed when writing fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Callable, Mapping

__all__ = ["atomic_write", "atomic_write_all", "atomic_write_text", "check_writable", "sha256_file"]


def _check_target(path: Path, parents: bool) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    folder = path.parent
    if parents:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"cannot write {path}: folder {folder} {what}")


def _create_temp(path: Path) -> Path:
    """An empty new file next to ``path``; ``os.open`` with mode 0o666 applies the umask itself."""
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"cannot create a temporary file next to {path}")  # pragma: no cover


def atomic_write(path, write_fn: Callable[[str], object], *, parents: bool = False) -> Path:
    """Write ``path`` atomically: ``write_fn(tmp)`` writes a temporary file that is then renamed to ``path``.

    ``tmp`` (a ``str``) is an empty file in the same folder with ``path``'s extension. If
    ``write_fn`` raises, the temporary file is removed and ``path`` is left as it was.
    ``parents=True`` creates missing folders; otherwise a missing folder raises
    ``FileNotFoundError`` and a ``path`` that is a directory ``IsADirectoryError``, both before
    ``write_fn`` runs. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    _check_target(path, parents)
    tmp = _create_temp(path)
    try:
        write_fn(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_all(writers: Mapping[str | os.PathLike, Callable[[str], object]]) -> list[Path]:
    """Write several files as one unit: every ``write_fn(tmp)`` first, then every rename.

    ``writers`` maps each target path to its ``write_fn`` (as in :func:`atomic_write`). If any
    writer fails, every temporary file is removed and no target is touched. The renames run with
    SIGINT blocked (in the main thread), so Ctrl-C cannot leave a new file beside an old one; only a
    SIGKILL or a power cut between two renames (microseconds) can.
    """
    paths = [Path(p) for p in writers]
    for path in paths:
        _check_target(path, parents=False)
    temps: list[Path] = []
    try:
        for path, write_fn in zip(paths, writers.values()):
            temps.append(_create_temp(path))
            write_fn(str(temps[-1]))
        with _sigint_blocked():
            for tmp, path in zip(temps, paths):
                os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    return paths


@contextlib.contextmanager
def _sigint_blocked():
    """Defer SIGINT (delivered on exit) while the body runs; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def check_writable(path, *, folder: bool = False) -> Path:
    """Fail now, not after an hour of computing, if ``path`` cannot be written.

    A file ``path`` (``folder=False``) must not be a directory and its folder must exist and
    accept a new file; a ``folder=True`` path may not exist yet, and then its nearest existing
    ancestor must accept one. The probe creates and removes an empty hidden file there (which
    catches read-only file systems, ``chattr +i`` folders and pseudo file systems such as
    ``/proc``, which permission bits alone do not). Raises ``OSError`` naming the path and why.
    """
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"cannot write into {path}: it is not a folder")
        probe_dir = path
        while not probe_dir.exists():
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise NotADirectoryError(f"cannot create {path}: {probe_dir} is not a folder")
        probe = probe_dir / ".jdq-write-probe"
    else:
        _check_target(path, parents=False)
        probe = path
    try:
        tmp = _create_temp(probe)
    except OSError as e:
        raise type(e)(f"cannot write {path}: {e.strerror or e}") from None
    tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path, text: str, *, encoding: str = "utf-8", parents: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    def write(tmp):
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)

    return atomic_write(path, write, parents=parents)


def sha256_file(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
