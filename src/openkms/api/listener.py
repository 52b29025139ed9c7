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
import sys
from collections.abc import Callable
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


def tls_options(settings: Any) -> dict[str, Any]:
    """granian's TLS options for the settings (none for plain HTTP): TLS 1.2 at least; with a
    client CA, a certificate chained to it is required of every client (mTLS). The files are
    loaded here first, so that a wrong file, a key that does not match or a bad CA stops the start
    with one line."""
    if not settings.tls_cert:
        return {}
    import ssl
    from pathlib import Path

    from granian.constants import SSLProtocols

    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca:
            context.load_verify_locations(settings.tls_client_ca)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ConfigurationError(f"TLS: cannot use --tls-cert {settings.tls_cert} / --tls-key {settings.tls_key}"
                                 + (f" / --tls-client-ca {settings.tls_client_ca}" if settings.tls_client_ca else "")
                                 + f": {reason}") from None
    options: dict[str, Any] = {"ssl_cert": Path(settings.tls_cert), "ssl_key": Path(settings.tls_key),
                               "ssl_protocol_min": SSLProtocols.tls12}
    if settings.tls_client_ca:
        options.update(ssl_ca=Path(settings.tls_client_ca), ssl_client_verify=True)
    return options


def serve(target: str, sock: socket.socket, tls_check: Callable[[], object] | None = None, **options: Any) -> None:
    """Run granian (RSGI, one worker) on the socket `bind` made; returns when the server stops.

    SIGHUP, when serving TLS, takes the certificate and key files anew: `tls_check()` reads them
    first (ConfigurationError: the server goes on with what it has); then the worker stops as on
    SIGTERM (its calls in flight answered, the audit writer flushed, its final digest signed) and a
    new worker starts, reading the files. Connections that arrive meanwhile wait in the listening
    socket's backlog, which this process holds open throughout: none is refused. (granian's own
    reload starts the new worker before it stops the old one: two processes of one node would write
    its audit chain at once.) Without TLS there is nothing to reload, and SIGHUP is ignored."""
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

        def signal_handler_reload(self, *args: Any, **kwargs: Any) -> None:
            if tls_check is None:
                print("openkms: SIGHUP ignored: no TLS certificate to reload; restart the server to take new "
                      "settings", file=sys.stderr, flush=True)
                return
            super().signal_handler_reload(*args, **kwargs)  # the serving loop calls _reload

        def _reload(self, spawn_target: Any, target_loader: Any) -> None:
            self.reload_signal = False
            self.main_loop_interrupt.clear()
            assert tls_check is not None
            try:
                tls_check()
            except ConfigurationError as exc:
                print(f"openkms: SIGHUP: {exc}; still serving the certificate loaded before", file=sys.stderr,
                      flush=True)
                return
            print("openkms: SIGHUP: reloading the TLS certificate: the worker answers its calls in flight, "
                  "then a new one starts", file=sys.stderr, flush=True)
            self._stop_workers()
            self._spawn_workers(spawn_target, target_loader)

    host, port = sock.getsockname()[:2]
    BoundServer(target, address=host, port=port, backlog=BACKLOG, **options).serve()
