"""Helpers for running `openkms xks-proxy` as a real process: its TOML file, TLS certificates made
with the `openssl` command, and a client that signs XKS requests with botocore's SigV4Auth (service
`kms-xks-proxy`) and sends them over http.client, keeping its connection alive.

Used by tests/test_xks_proxy.py and bench/xks_proxy.py; openkms's own external key store tests can
start a proxy with them too.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "xks-user-pin"
REGION = "us-east-1"
SERVICE = "kms-xks-proxy"
CLIENT_NAME = "kms.example.test"
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def access_key_id() -> str:
    """A fresh access key id as the spec wants it: 20-30 characters of A-Z and 2-7."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(24))


def secret_access_key() -> str:
    """A fresh secret: the base64 of 32 random bytes (44 characters)."""
    return base64.b64encode(os.urandom(32)).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


# -- certificates, made as an operator would: with openssl --------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr}")


class Pki:
    """A test CA, the proxy's server certificate (RSA, so that TLS 1.2's ECDHE-RSA suites apply; SAN
    DNS:localhost and IP:127.0.0.1) and client certificates: good, expired, self-signed, wrong name."""

    def __init__(self, directory: Path) -> None:
        self.dir = d = directory
        d.mkdir(parents=True, exist_ok=True)
        self.ca, self.ca_key = d / "ca.pem", d / "ca.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                 "ca.key", "-out", "ca.pem", "-days", "30", "-subj", "/CN=openkms test CA", cwd=d)
        (d / "newcerts").mkdir(exist_ok=True)
        (d / "index.txt").write_text("")
        (d / "serial").write_text("1000\n")
        (d / "ca.cnf").write_text(
            "[ca]\ndefault_ca = test\n[test]\n"
            f"dir = {d}\ndatabase = $dir/index.txt\nnew_certs_dir = $dir/newcerts\ncertificate = $dir/ca.pem\n"
            "private_key = $dir/ca.key\nserial = $dir/serial\ndefault_md = sha256\npolicy = anything\n"
            "unique_subject = no\ncopy_extensions = none\ndefault_days = 30\n[anything]\ncommonName = supplied\n")
        self.server_cert, self.server_key = self._issue("server", "localhost", "DNS:localhost,IP:127.0.0.1",
                                                        key="rsa")
        self.client = self._issue("client", CLIENT_NAME, f"DNS:{CLIENT_NAME}")
        self.expired = self._issue("expired", CLIENT_NAME, f"DNS:{CLIENT_NAME}",
                                   dates=("20200101000000Z", "20200201000000Z"))
        self.wrong_name = self._issue("wrong-name", "other.example.test", "DNS:other.example.test")
        self.self_signed = (d / "self-signed.pem", d / "self-signed.key")
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                 "self-signed.key", "-out", "self-signed.pem", "-days", "30", "-subj", f"/CN={CLIENT_NAME}",
                 "-addext", f"subjectAltName=DNS:{CLIENT_NAME}", cwd=d)

    def _issue(self, name: str, cn: str, san: str, key: str = "ec",
               dates: tuple[str, str] | None = None) -> tuple[Path, Path]:
        d = self.dir
        newkey = ["-newkey", "rsa:2048"] if key == "rsa" else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        _openssl("req", *newkey, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
                 cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        period = ["-startdate", dates[0], "-enddate", dates[1]] if dates else []
        _openssl("ca", "-batch", "-config", "ca.cnf", "-notext", "-in", f"{name}.csr", "-out", f"{name}.pem",
                 "-extfile", f"{name}.ext", *period, cwd=d)
        return d / f"{name}.pem", d / f"{name}.key"

    def client_context(self, cert: tuple[Path, Path] | None = None, maximum: ssl.TLSVersion | None = None,
                       ciphers: str | None = None) -> ssl.SSLContext:
        """A client context trusting the test CA, presenting `cert` if given."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        if maximum is not None:
            context.maximum_version = maximum
        if ciphers is not None:
            context.set_ciphers(ciphers)
        return context


# -- the proxy's file and process ---------------------------------------------------------------

@dataclass
class Store:
    """One [[external_key_stores]] entry."""

    prefix: str
    credentials: list[tuple[str, str]]
    key_ids: list[str] | None = None
    disabled: list[str] = field(default_factory=list)
    requests_per_second: int | None = None

    @classmethod
    def new(cls, prefix: str, count: int = 1, **kwargs: Any) -> Store:
        return cls(prefix, [(access_key_id(), secret_access_key()) for _ in range(count)], **kwargs)

    def toml(self) -> str:
        creds = ", ".join(f'{{ access_key_id = "{a}", secret_access_key = "{s}" }}' for a, s in self.credentials)
        lines = ["[[external_key_stores]]", f'uri_path_prefix = "{self.prefix}"', f"credentials = [ {creds} ]"]
        if self.key_ids is not None:
            lines.append(f"xks_key_id_set = {json.dumps(self.key_ids)}")
        if self.disabled:
            lines.append(f"disabled_xks_key_ids = {json.dumps(self.disabled)}")
        if self.requests_per_second is not None:
            lines.append(f"requests_per_second = {self.requests_per_second}")
        return "\n".join(lines) + "\n"


def proxy_toml(*, port: int, token_label: str, stores: list[Store], pki: Pki | None = None, mtls: bool = False,
               client_dns_name: str | None = CLIENT_NAME, host: str = "127.0.0.1", health: str = "",
               extra: str = "") -> str:
    """A complete configuration file."""
    text = f'[server]\nhost = "{host}"\nport = {port}\nregion = "{REGION}"\n'
    if pki is not None:
        text += f'[tls]\ncert = "{pki.server_cert}"\nkey = "{pki.server_key}"\n'
        if mtls:
            text += f'client_ca = "{pki.ca}"\n'
            if client_dns_name:
                text += f'client_dns_name = "{client_dns_name}"\n'
            else:
                text += "client_any_name = true\n"  # any certificate of the CA: asked for explicitly
    text += f'[pkcs11]\nmodule = "{SOFTHSM_MODULE}"\ntoken_label = "{token_label}"\n'
    text += f'[health]\ntest_key_label = "xks-health"\n{health}'
    return text + extra + "".join(store.toml() for store in stores)


def cli(*args: str, env: dict[str, str] | None = None, pin: str | None = PIN, timeout: float = 60) \
        -> subprocess.CompletedProcess[str]:
    """`openkms xks-proxy ARGS` as a process (the PIN in OPENKMS_XKS_PKCS11_PIN unless `pin` is None)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OPENKMS_")}
    if pin is not None:
        environment["OPENKMS_XKS_PKCS11_PIN"] = pin
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "openkms.cli.main", "xks-proxy", *args], env=environment,
                          capture_output=True, text=True, timeout=timeout, check=False)


class ProxyProcess:
    """`openkms xks-proxy --config FILE` on a loopback port; `start` waits for its first line."""

    def __init__(self, config: Path, port: int, tls: bool, pin: str = PIN) -> None:
        self.config = config
        self.port = port
        self.tls = tls
        self.pin = pin
        self.log_path = config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://localhost:{self.port}"

    def start(self, timeout: float = 30.0) -> ProxyProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENKMS_")}
        env["OPENKMS_XKS_PKCS11_PIN"] = self.pin
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "openkms.cli.main", "xks-proxy", "--config",
                                      str(self.config)], stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"xks-proxy exited with {self.proc.returncode}:\n{self.output()}")
            if "serving on" in self.output():
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"xks-proxy did not start:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, text: str, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until the log holds `text` `count` times (lines are written after the answer)."""
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not {count} time(s) in the log:\n{self.output()[-2000:]}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def sighup(self, wait_for: str = "SIGHUP:", timeout: float = 10.0) -> None:
        """Send SIGHUP and wait until the proxy logs that it handled it."""
        before = self.output().count(wait_for)
        self.signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.output().count(wait_for) <= before:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {wait_for!r} in the log after SIGHUP:\n{self.output()[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> int | None:
        """SIGTERM, then wait; returns the exit status."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                code = self.proc.wait(timeout=15)
        self._log.close()
        self.proc = None
        return code


# -- a signing client -----------------------------------------------------------------------------

def metadata(operation: str = "Encrypt", request_id: str | None = None, **extra: str) -> dict[str, str]:
    """requestMetadata as AWS KMS sends it for a key operation."""
    return {"awsPrincipalArn": "arn:aws:iam::111122223333:user/alice",
            "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "kmsOperation": operation, "kmsRequestId": request_id or f"req-{secrets.token_hex(8)}", **extra}


def health_metadata(request_id: str | None = None) -> dict[str, str]:
    return {"kmsRequestId": request_id or f"health-{secrets.token_hex(8)}", "kmsOperation": "KmsHealthCheck"}


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str | None:
        if self.status == 200:
            return None
        return str(self.json.get("errorName"))


def signed_headers(url: str, body: bytes, access_key_id: str, secret: str, *, when: datetime | None = None,
                   region: str = REGION, service: str = SERVICE, sign_content_type: bool = True) -> dict[str, str]:
    """The headers of a request signed by botocore's SigV4Auth: SignedHeaders content-type;host;x-amz-date
    (curl's choice) or, with `sign_content_type=False`, host;x-amz-date (AWS KMS's)."""
    request = AWSRequest(method="POST", url=url, data=body,
                         headers={"Content-Type": "application/json"} if sign_content_type else {})
    signer = SigV4Auth(Credentials(access_key_id, secret), service, region)
    if when is None:
        signer.add_auth(request)
    else:
        with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
            signer.add_auth(request)
    headers = {name: str(value) for name, value in request.headers.items()}
    headers.setdefault("Content-Type", "application/json")
    return headers


class XksClient:
    """Requests to one proxy with one credential, over one kept-alive connection."""

    def __init__(self, base: str, prefix: str, access_key_id: str, secret: str,
                 context: ssl.SSLContext | None = None, timeout: float = 10.0) -> None:
        self.base = base
        self.prefix = prefix
        self.access_key_id = access_key_id
        self.secret = secret
        self.context = context
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def path(self, api: str, key_id: str | None = None) -> str:
        return f"{self.prefix}/kms/xks/v1/health" if api == "health" else \
            f"{self.prefix}/kms/xks/v1/keys/{key_id}/{api}"

    def connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            host, _, port = self.base.split("://", 1)[1].partition(":")
            if self.base.startswith("https://"):
                self._conn = http.client.HTTPSConnection(host, int(port), context=self.context, timeout=self.timeout)
            else:
                self._conn = http.client.HTTPConnection(host, int(port), timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def send(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Answer:
        """One raw request; the connection is kept unless the proxy closes it."""
        conn = self.connection()
        try:
            conn.request(method, path, body=body or None, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
        except (ConnectionError, http.client.HTTPException):
            self.close()
            raise
        answer = Answer(response.status, data, {k.lower(): v for k, v in response.getheaders()})
        if answer.headers.get("connection", "").lower() == "close":
            self.close()
        return answer

    def post(self, path: str, document: Any, *, raw: bytes | None = None, access_key_id: str | None = None,
             secret: str | None = None, **sign: Any) -> Answer:
        body = raw if raw is not None else json.dumps(document).encode()
        headers = signed_headers(self.base + path, body, access_key_id or self.access_key_id,
                                 secret or self.secret, **sign)
        return self.send("POST", path, body, headers)

    # The four APIs, with what AWS KMS sends by default.
    def health(self, **kwargs: Any) -> Answer:
        return self.post(self.path("health"), {"requestMetadata": health_metadata()}, **kwargs)

    def metadata(self, key_id: str, **kwargs: Any) -> Answer:
        md = metadata("DescribeKey")
        return self.post(self.path("metadata", key_id), {"requestMetadata": md}, **kwargs)

    def encrypt(self, key_id: str, plaintext: bytes, aad: bytes | None = None, integrity: bool = True,
                request_id: str | None = None, **fields: Any) -> Answer:
        document: dict[str, Any] = {"requestMetadata": metadata("Encrypt", request_id), "plaintext": b64(plaintext),
                                    "encryptionAlgorithm": "AES_GCM"}
        if aad is not None:
            document["additionalAuthenticatedData"] = b64(aad)
        if integrity:
            document["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256"
        document.update(fields)
        return self.post(self.path("encrypt", key_id), document)

    def decrypt(self, key_id: str, sealed: dict[str, Any], aad: bytes | None = None, metadata_: bytes | None = None,
                **fields: Any) -> Answer:
        document: dict[str, Any] = {"requestMetadata": metadata("Decrypt"), "encryptionAlgorithm": "AES_GCM",
                                    **{k: sealed[k] for k in ("ciphertext", "initializationVector",
                                                              "authenticationTag")}}
        if aad is not None:
            document["additionalAuthenticatedData"] = b64(aad)
        if metadata_ is not None:
            document["ciphertextMetadata"] = b64(metadata_)
        elif "ciphertextMetadata" in sealed:
            document["ciphertextMetadata"] = sealed["ciphertextMetadata"]
        document.update(fields)
        return self.post(self.path("decrypt", key_id), document)
