"""The listening socket, bound by `openkms serve` before anything else happens, and the granian
server that serves on it.

granian on Linux lets each worker bind the address itself with SO_REUSEPORT, so a second server
started on a port that one already serves would silently share it (the kernel splitting
connections between two unrelated stores). openkms binds the socket once, in the main process,
without SO_REUSEPORT unless the operator asks for it, and hands that very socket to granian's
worker: a port in use fails the start at once, before the store is opened or anything is written.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from ..errors import ConfigurationError

BACKLOG = 2048


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on host:port, or ConfigurationError with a one-line reason."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        raise ConfigurationError(f"cannot listen on {where}: {host} is not an address or a known host name") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEADDR lets a restart bind while old connections sit in TIME_WAIT; it never lets
        # two listeners share a port (that is SO_REUSEPORT, only on request).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(f"{where} is already in use") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigurationError(f"cannot listen on {where}: {host} is not an address of this machine") from None
        if exc.errno == errno.EACCES:
            raise ConfigurationError(f"cannot listen on {where}: permission denied") from None
        raise ConfigurationError(f"cannot listen on {where}: {exc.strerror}") from None
    return sock


def serve(target: str, sock: socket.socket, **options: Any) -> None:
    """Run granian (RSGI, one worker) on the socket `bind` made; returns when the server stops."""
    from granian._granian import SocketHolder
    from granian.server import Server

    class BoundServer(Server):  # type: ignore[misc, valid-type]
        # granian builds its listener in `_init_shared_socket`; here it takes ours instead. The
        # worker process inherits the descriptor when it is forked.
        def _init_shared_socket(self) -> None:
            self._ssp = None
            self._shd = SocketHolder(sock.fileno(), False, BACKLOG)  # type: ignore[call-arg]
            self._sfd = sock.fileno()
            self._sso = None

        def _drop_shared_socket(self) -> None:
            pass

    host, port = sock.getsockname()[:2]
    BoundServer(target, address=host, port=port, backlog=BACKLOG, **options).serve()
