"""A real `openkms serve` process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import boto3
from botocore.config import Config

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    # Settings every server gets unless its own `env` says otherwise (tests/conftest.py sets the
    # suite's; a benchmark keeps the shipping defaults).
    defaults: ClassVar[dict[str, str]] = {}

    def __init__(self, data_dir: Path, storage_url: str | None = None, env: dict[str, str] | None = None,
                 port: int | None = None, extra_args: list[str] | None = None, ca_bundle: str | None = None,
                 client_cert: tuple[str, str] | None = None) -> None:
        """`ca_bundle`: the server serves HTTPS (its --tls-* flags in `extra_args`) with a
        certificate from this CA; `client_cert` (cert, key): what the test's clients present."""
        self.ca_bundle = ca_bundle
        self.client_cert = client_cert
        self.data_dir = Path(data_dir)
        self.storage_url = storage_url
        self.env = dict(env or {})
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server-{self.port}.log"

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.ca_bundle else 'http'}://127.0.0.1:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.ca_bundle:
            return None
        context = ssl.create_default_context(cafile=self.ca_bundle)
        if self.client_cert:
            context.load_cert_chain(*self.client_cert)
        return context

    @property
    def access_key_id(self) -> str:
        return self.env.get("OPENKMS_BOOTSTRAP_ACCESS_KEY_ID") or self._credentials()[0]

    @property
    def secret_access_key(self) -> str:
        return self.env.get("OPENKMS_BOOTSTRAP_SECRET_ACCESS_KEY") or self._credentials()[1]

    def _credentials(self) -> tuple[str, str]:
        import configparser

        parser = configparser.ConfigParser()
        parser.read(self.data_dir / "credentials")
        return parser["default"]["aws_access_key_id"], parser["default"]["aws_secret_access_key"]

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "openkms.cli.main", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir)]
        if self.storage_url:
            cmd += ["--storage-url", self.storage_url]
        return cmd + self.extra_args

    def start(self, timeout: float = 30.0, expect_failure: bool = False) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENKMS_")}
        env.update(ServerProcess.defaults)
        env.update(self.env)
        self.log = open(self.log_path, "ab")  # noqa: SIM115 -- closed in stop(), after the process
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        if expect_failure:
            self.proc.wait(timeout=timeout)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"openkms exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.endpoint + "/health", timeout=1, context=self.ssl_context()) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"openkms did not become healthy:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.log.close()
        self.proc = None

    def client(self, access_key_id: str | None = None, secret: str | None = None, service: str = "kms",
               validate: bool = True, retry: bool = True) -> Any:
        """A boto3 client; it retries a failed call once unless `retry` is False."""
        retries = {"max_attempts": 1} if retry else {"total_max_attempts": 1}
        return boto3.client(
            service, endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=access_key_id or self.access_key_id,
            aws_secret_access_key=secret or self.secret_access_key,
            verify=self.ca_bundle if self.ca_bundle else None,
            config=Config(retries=retries, parameter_validation=validate,  # type: ignore[arg-type]
                          client_cert=self.client_cert))
