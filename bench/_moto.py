"""moto_server, the usual Python AWS emulator, as the peer benchmarks compare openkms against.

`running_servers(workdir, storage_url=..., moto=...)` starts both sides of a comparison, a freshly
bootstrapped `openkms serve` and `moto_server`, and stops them at the end:

    with running_servers(workdir, storage_url=None, moto=True) as servers:
        for name, server in servers:          # ("openkms", ...), then ("moto", ...)
            key_id = create_key(name, server.client(), KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")

A BenchError raised inside the block comes out with the end of both servers' logs appended (they
live in `workdir`, which the caller usually deletes right after).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol

import boto3
from botocore.config import Config

from tests.server import ServerProcess  # the repository root is on sys.path, or `bench` would not import

from ._load import REGION, BenchError, lift_quotas, log_tail, progress

EMPTY_DB_HINT = " (with --storage-url the database must be empty: the benchmark bootstraps openkms into it)"


def moto_command() -> list[str]:
    """How to start moto_server here, or BenchError saying how to install it."""
    path = shutil.which("moto_server")
    if path is not None:
        return [path]
    if importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask") is not None:
        return [sys.executable, "-m", "moto.server"]
    raise BenchError("moto_server is not installed: `pip install 'moto[server]'` "
                     "(it is in openkms's test extras), or pass --skip-moto")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """A `moto_server` process on a free loopback port. moto accepts any credentials."""

    access_key_id = "AKIAMOTOBENCHMARK000"
    secret_access_key = "moto-accepts-any-secret"

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        cmd = [*moto_command(), "-H", "127.0.0.1", "-p", str(self.port)]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- closed in stop(), after the process
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"moto_server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise BenchError(f"moto_server did not listen on port {self.port} within {timeout} s")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None

    def client(self, service: str = "kms") -> Any:
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key,
                            config=Config(retries={"max_attempts": 1}))


class KmsServer(Protocol):
    """What a benchmark needs of a server: where it listens, credentials to sign with, a boto3 client."""

    @property
    def endpoint(self) -> str: ...

    @property
    def access_key_id(self) -> str: ...

    @property
    def secret_access_key(self) -> str: ...

    def client(self) -> Any: ...


def bootstrap_env() -> dict[str, str]:
    """Environment that makes a fresh openkms create its admin with credentials known in advance."""
    return {
        "OPENKMS_BOOTSTRAP_ACCOUNT_ID": "111122223333",
        "OPENKMS_BOOTSTRAP_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "OPENKMS_BOOTSTRAP_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
    }


def openkms_hint(storage_url: str | None) -> str:
    """What to append to an openkms start or CreateKey failure: the empty-database reminder, if relevant."""
    return EMPTY_DB_HINT if storage_url else ""


@contextmanager
def running_servers(workdir: Path, *, storage_url: str | None = None,
                    moto: bool = True) -> Iterator[list[tuple[str, KmsServer]]]:
    """Start openkms (embedded SQLite, or `storage_url`, an EMPTY database) and moto_server unless
    `moto` is false; yield [(name, server)], openkms first; stop both on the way out.

    A BenchError from inside the block (or from starting) is re-raised with the end of the logs.
    """
    openkms = ServerProcess(workdir / "openkms-data", storage_url=storage_url, env=bootstrap_env())
    peer = MotoServer(workdir / "moto.log") if moto else None
    progress("starting openkms" + (" and moto_server" if peer else ""))
    try:
        # A failed start says why itself, its log included.
        try:
            openkms.start()
            lift_quotas(openkms)
        except RuntimeError as exc:
            raise BenchError(str(exc).rstrip() + openkms_hint(storage_url)) from exc
        servers: list[tuple[str, KmsServer]] = [("openkms", openkms)]
        if peer is not None:
            peer.start()
            servers.append(("moto", peer))
        try:
            yield servers
        except BenchError as exc:
            # The logs live in a temporary directory that is about to go: show the end of them now.
            logs = [("openkms", openkms.output())] + ([("moto_server", peer.output())] if peer else [])
            shown = "".join(f"\n--- {name} log (end) ---\n{log_tail(text)}"
                            for name, text in logs if text.strip())
            raise BenchError(f"{exc}{shown}") from exc
    finally:
        openkms.stop()
        if peer is not None:
            peer.stop()
