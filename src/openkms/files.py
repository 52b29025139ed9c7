"""Writing secret files (credentials, keys, wrapped material): created with a mode, and atomically
where a reader must never see half a file. Standard library only, for the client and the server."""

from __future__ import annotations

import os
from pathlib import Path


def write_file(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600, fsync: bool = False) -> None:
    """Write ``data`` to ``path``, created with ``mode`` if it does not exist (less the umask, as
    os.open does) and truncated if it does; with ``fsync``, on disk before this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        if fsync:
            out.flush()
            os.fsync(fd)


def replace_file(path: Path, data: bytes, *, mode: int = 0o600, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: into ``path.with_suffix(".tmp")``, then renamed over
    ``path``, so that readers see the old file or the new one, never part of one. With ``fsync``
    (the default) the data is on disk before the rename, so that a crash cannot leave an empty file."""
    tmp = path.with_suffix(".tmp")
    write_file(tmp, data, mode=mode, fsync=fsync)
    os.replace(tmp, path)
