"""TLS and mTLS on the API listener, with certificates made by the `openssl` binary: boto3 (verify=)
and the AWS CLI (--ca-bundle, AWS_CA_BUNDLE) over HTTPS; client certificates required with
--tls-client-ca (a missing or untrusted one is refused at the handshake); plain HTTP refused
beyond loopback unless --insecure-http; bad TLS files stop the start with one line."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from botocore.exceptions import SSLError

from tests.conftest import bootstrap_env
from tests.server import ServerProcess, free_port
from tests.test_awscli import AwsCli
from tests.test_one_server import refuse


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from another CA
    stranger_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(cwd: Path, name: str, ca: str, subject: str, extensions: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=cwd)
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                 f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}", cwd=d)
    _issue(d, "server", "ca", "/CN=localhost",
           "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _issue(d, "client", "ca", "/CN=app", "extendedKeyUsage=clientAuth\n")
    _issue(d, "stranger", "other-ca", "/CN=stranger", "extendedKeyUsage=clientAuth\n")
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "stranger.pem", d / "stranger.key")


def tls_args(pki: Pki, mtls: bool = False) -> list[str]:
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    return args + (["--tls-client-ca", str(pki.ca)] if mtls else [])


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("tls") / "data", env=bootstrap_env(), extra_args=tls_args(pki),
                           ca_bundle=str(pki.ca))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("mtls") / "data", env=bootstrap_env(),
                           extra_args=tls_args(pki, mtls=True), ca_bundle=str(pki.ca),
                           client_cert=(str(pki.client_cert), str(pki.client_key)))
    server.start()
    yield server
    server.stop()


def handshake(port: int, context: ssl.SSLContext) -> str:
    """The TLS version negotiated with the server, after a request on the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = tls.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        return str(tls.version())


def test_boto3_over_tls(tls_server: ServerProcess) -> None:
    assert tls_server.endpoint.startswith("https://")
    assert f"openkms serving on https://127.0.0.1:{tls_server.port}" in tls_server.output()
    kms = tls_server.client(retry=False)
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    data_key = kms.generate_data_key(KeyId=key, KeySpec="AES_256")
    assert kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    sm = tls_server.client(service="secretsmanager", retry=False)
    sm.create_secret(Name="tls/db", SecretString="over TLS")
    assert sm.get_secret_value(SecretId="tls/db")["SecretString"] == "over TLS"


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server: ServerProcess, pki: Pki) -> None:
    untrusting = ServerProcess(tls_server.data_dir, port=tls_server.port, env=tls_server.env,
                               ca_bundle=str(pki.server_cert.parent / "other-ca.pem"))
    with pytest.raises(SSLError):
        untrusting.client(retry=False).list_keys()


def test_tls_12_at_least_and_no_plain_http(tls_server: ServerProcess, pki: Pki) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    assert handshake(tls_server.port, context) in ("TLSv1.2", "TLSv1.3")
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(tls_server.port, context) == "TLSv1.2"
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(pki.ca))
    with warnings.catch_warnings():  # the point is an old version: offered, and refused
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(tls_server.port, old)
    # Plain HTTP to the TLS port gets no answer an HTTP client could take for one.
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=5) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/1.1 200")


def test_the_aws_cli_over_tls(tls_server: ServerProcess, pki: Pki, tmp_path: Path) -> None:
    cli = AwsCli(tls_server, tmp_path)
    key = cli.text("create-key", "--query", "KeyMetadata.KeyId", "--ca-bundle", str(pki.ca))
    out = cli.json("encrypt", "--key-id", key, "--plaintext", "cli",  # the CLI (v1) sends text as it is
                   env=dict(cli.env, AWS_CA_BUNDLE=str(pki.ca)))
    blob = out["CiphertextBlob"]
    (tmp_path / "blob").write_bytes(base64.b64decode(blob))
    plain = cli.text("decrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'blob'}", "--query", "Plaintext",
                     env=dict(cli.env, AWS_CA_BUNDLE=str(pki.ca)))
    assert base64.b64decode(plain) == b"cli"
    refused = cli.run("list-keys", check=False)  # no CA bundle: the system's CAs do not know ours
    assert refused.returncode != 0 and "SSL" in refused.stderr


def test_mtls_with_a_client_certificate(mtls_server: ServerProcess) -> None:
    assert "client certificates required" in mtls_server.output()
    kms = mtls_server.client(retry=False)
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    assert kms.decrypt(CiphertextBlob=kms.encrypt(KeyId=key, Plaintext=b"m")["CiphertextBlob"])["Plaintext"] == b"m"


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_mtls_refuses_a_client_without_a_trusted_certificate(mtls_server: ServerProcess, pki: Pki, who: str) -> None:
    cert = None if who == "no certificate" else (str(pki.stranger_cert), str(pki.stranger_key))
    stranger = ServerProcess(mtls_server.data_dir, port=mtls_server.port, env=mtls_server.env,
                             ca_bundle=str(pki.ca), client_cert=cert)
    with pytest.raises(SSLError):
        stranger.client(retry=False).list_keys()
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    with pytest.raises((ssl.SSLError, OSError)):  # refused in the handshake: no request is answered
        handshake(mtls_server.port, context)


def test_plain_http_beyond_loopback_needs_insecure_http(tmp_path: Path) -> None:
    exposed = ServerProcess(tmp_path / "data", env=bootstrap_env(), extra_args=["--host", "0.0.0.0"])
    line = refuse(exposed)
    assert "refusing to listen on 0.0.0.0 without TLS" in line and "--insecure-http" in line
    assert not (tmp_path / "data").exists()  # refused before anything was written
    allowed = ServerProcess(tmp_path / "data", env=bootstrap_env(), port=free_port(),
                            extra_args=["--host", "0.0.0.0", "--insecure-http"])
    allowed.start()
    try:
        assert "WARNING: serving plain HTTP on 0.0.0.0 (--insecure-http)" in allowed.output()
        allowed.client(retry=False).list_keys()
    finally:
        allowed.stop()


@pytest.mark.parametrize("case", ["missing cert file", "key of another certificate", "cert without key",
                                  "client CA without TLS", "garbage CA"])
def test_bad_tls_files_refuse_the_start(pki: Pki, tmp_path: Path, case: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    args = {
        "missing cert file": ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(pki.server_key)],
        "key of another certificate": ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)],
        "cert without key": ["--tls-cert", str(pki.server_cert)],
        "client CA without TLS": ["--tls-client-ca", str(pki.ca)],
        "garbage CA": [*tls_args(pki), "--tls-client-ca", str(garbage)],
    }[case]
    line = refuse(ServerProcess(tmp_path / "data", env=bootstrap_env(), extra_args=args))
    assert "tls" in line.lower(), line
    assert not (tmp_path / "data").exists()


def test_openkms_admin_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    """`openkms admin` checks the server's certificate against AWS_CA_BUNDLE or --ca-bundle, as the AWS CLI does."""
    from tests.test_cli import clean_env, one_line_failure, openkms

    env = clean_env(OPENKMS_ENDPOINT_URL=tls_server.endpoint, OPENKMS_DATA_DIR=str(tls_server.data_dir))
    line = one_line_failure(openkms("admin", "get-user", env=env))
    assert "does not verify" in line and "--ca-bundle" in line, line
    for how, extra_env in ((["--ca-bundle", str(pki.ca)], {}), ([], {"AWS_CA_BUNDLE": str(pki.ca)}),
                           (["--no-verify-ssl"], {})):
        proc = openkms("admin", "get-user", *how, "--query", "User.Level", "--output", "text",
                       env={**env, **extra_env})
        assert (proc.returncode, proc.stdout) == (0, "operator\n"), (how, extra_env, proc.stderr)
    other = one_line_failure(openkms("admin", "get-user", "--ca-bundle", str(pki.client_cert), env=env))
    assert "does not verify" in other, other


def peer_serial(port: int, ca: Path) -> int:
    """The serial number of the certificate the server presents on a new connection."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_reloads_the_certificate_under_load_and_loses_no_call(pki: Pki, tmp_path: Path) -> None:
    """A renewed certificate, taken on SIGHUP while clients are busy: every call is answered (boto3
    as it ships, retrying a connection the old worker closed), new connections get the new
    certificate, a broken pair of files changes nothing, and the audit chain verifies."""
    import os
    import shutil
    import signal
    import sys
    import threading
    import time

    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    server = ServerProcess(tmp_path / "data", env=bootstrap_env(), ca_bundle=str(pki.ca),
                           extra_args=["--tls-cert", str(cert), "--tls-key", str(key)])
    server.start()
    try:
        assert server.proc is not None
        first = peer_serial(server.port, pki.ca)
        key_id = server.client().create_key()["KeyMetadata"]["KeyId"]
        failures: list[str] = []
        answered = [0]
        done = threading.Event()

        def load() -> None:
            kms = server.client()  # one retry, as tests/server.py configures boto3
            while not done.is_set():
                try:
                    kms.encrypt(KeyId=key_id, Plaintext=b"x")
                    answered[0] += 1
                except Exception as exc:  # every failure is the finding
                    failures.append(repr(exc)[:200])

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        # A renewed certificate (same CA, same name, a new serial), written over the old files.
        _issue(pki.ca.parent, "renewed", "ca", "/CN=localhost",
               "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        shutil.copy(pki.ca.parent / "renewed.pem", cert)
        shutil.copy(pki.ca.parent / "renewed.key", key)
        before = answered[0]
        os.kill(server.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            try:
                if peer_serial(server.port, pki.ca) != first:
                    break
            except (ssl.SSLError, ConnectionError):
                pass  # a handshake the old worker cut as it stopped: a client connects again, as boto3 does
            assert time.monotonic() < deadline, "the new certificate was not served within 30 s"
            time.sleep(0.2)
        time.sleep(0.5)
        # A key that does not match the certificate: logged, and the server keeps what it has.
        shutil.copy(pki.client_key, key)
        os.kill(server.proc.pid, signal.SIGHUP)
        time.sleep(1.0)
        done.set()
        for t in threads:
            t.join()
        assert not failures, failures[:3]
        assert answered[0] > before
        renewed = peer_serial(server.port, pki.ca)
        assert renewed != first
        assert "still serving the certificate loaded before" in server.output()
        assert server.proc.poll() is None
        assert server.client().decrypt(
            CiphertextBlob=server.client().encrypt(KeyId=key_id, Plaintext=b"y")["CiphertextBlob"])["Plaintext"] == b"y"
    finally:
        server.stop()
    verify = subprocess.run([sys.executable, "-m", "openkms.cli.main", "audit", "verify", "--data-dir",
                             str(server.data_dir)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.splitlines()[0].endswith(": OK")
