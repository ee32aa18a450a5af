"""Atomic file writing, in one place: a file appears complete under its name, or not at all.

Every writer fills a temporary file ``.<name>.<random>.tmp`` in the target's folder (the same file system, so
the rename is atomic), flushes and fsyncs it, then either renames it over the target (``open_atomic`` and the
``write_*`` helpers) or links it to the first of several names that does not exist yet (``create_new``: a
file that is never replaced, also not by another process in the meantime). A failed write removes its
temporary file; a killed one leaves at most a ``.tmp`` file, never a truncated target. The file gets the
permissions ``open`` gives a new one (0666 less the umask: a run folder shared with a group stays readable by
it), not ``mkstemp``'s 0600.

Leaf module: imports nothing of the package (``torch`` only when ``torch_save`` runs).
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator


def _temporary(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0o077)  # read only by setting it; mkstemp's own files are 0600 whatever it is
    os.umask(umask)
    os.fchmod(handle, 0o666 & ~umask)
    return handle, tmp


@contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A stream (``mode`` "w" or "wb") whose content replaces ``path`` when the block ends without an error."""
    path = Path(path)
    handle, tmp = _temporary(path)
    try:
        with os.fdopen(handle, mode) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Replace ``path`` with ``text``, atomically."""
    with open_atomic(path) as stream:
        stream.write(text)
    return Path(path)


def write_json(obj, path: str | os.PathLike) -> Path:
    """Replace ``path`` with ``obj`` as indented JSON, atomically."""
    return write_text(json.dumps(obj, indent=2) + "\n", path)


def torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path``, atomically."""
    import torch

    with open_atomic(path, "wb") as stream:
        torch.save(obj, stream)
    return Path(path)


def create_new(text: str, candidates: Iterable[str | os.PathLike]) -> Path:
    """Write ``text`` to the first of ``candidates`` (paths in one folder) that does not exist; returns it.

    The file is complete before it appears and never replaces one: the temporary file is hard-linked to each
    name in turn, and a link fails on a name that exists.
    """
    candidates = iter(map(Path, candidates))
    first = next(candidates)
    handle, tmp = _temporary(first)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        for path in itertools.chain([first], candidates):
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"every candidate name exists (the last: {path})")
    finally:
        os.unlink(tmp)


def replace_symlink(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Point ``link`` at ``target`` (stored as written, e.g. a bare file name), never leaving no link."""
    tmp = f"{link}.tmp{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
