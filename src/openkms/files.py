"""Writing secret files (credentials, keys, wrapped material): created with a mode, and atomically
where a reader must never see half a file. Standard library only, for the client and the server."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

# What fsync of a directory raises where directories cannot be synced (not a failing disk).
_NO_DIRECTORY_SYNC = {errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM, errno.ENOTSUP,
                      getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


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
    (the default) the data is on disk before the rename, so that a crash cannot leave an empty file,
    and the rename is on disk before this returns (the directory is synced too), so that a crash
    cannot bring the old file back after a caller has gone on (say, to record a new root key file)."""
    tmp = path.with_suffix(".tmp")
    try:
        write_file(tmp, data, mode=mode, fsync=fsync)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):  # no half-written secret left behind
            tmp.unlink()
        raise
    if fsync:
        sync_directory(path.parent)


def sync_directory(path: Path) -> None:
    """Put a directory's entries (a rename, a new file) on disk. Where directories cannot be
    opened or synced (Windows, some file systems), it does nothing: that is all they offer; a
    failing disk (EIO) still raises."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIRECTORY_SYNC:
            raise
    finally:
        os.close(fd)
