"""The root key in an HSM token (SoftHSM2), and moving the root key between sources, through real
`openkms serve` and `openkms root migrate` processes.

First start with --root-pkcs11-*: the token holds a non-extractable AES key that wraps the root key,
the store only the wrapped root key, no root.key file exists; restarts unwrap it in the token;
without the token the start fails at once with one line and changes nothing; `openkms root
migrate` moves the root key to a file, a passphrase and back to a token, and what was encrypted
first still decrypts at every step, while the old source stops opening the store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SoftHsm, bootstrap_env
from tests.server import ServerProcess
from tests.test_lifecycle import tree_digest

PIN = "root-pin-123"


def pkcs11_flags(hsm: SoftHsm, label: str, key_label: str = "openkms-root", prefix: str = "root-pkcs11") -> list[str]:
    return [f"--{prefix}-module", hsm.module, f"--{prefix}-token-label", label, f"--{prefix}-key-label", key_label]


def migrate(data: Path, store_url: str | None, target: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OPENKMS_")}
    cmd = [sys.executable, "-m", "openkms.cli.main", "root", "migrate", "--to", target, "--data-dir", str(data)]
    if store_url:
        cmd += ["--storage-url", store_url]
    return subprocess.run([*cmd, *args], env={**base, **env}, capture_output=True, text=True, timeout=120,
                          check=False)


def refused(server: ServerProcess) -> str:
    server.start(expect_failure=True)
    out = server.output().strip().splitlines()
    assert out and out[-1].startswith("openkms: cannot start:"), out
    assert "Traceback" not in server.output()
    return out[-1]


def decrypts(server: ServerProcess, blob: bytes) -> bytes:
    server.start()
    try:
        return bytes(server.client().decrypt(CiphertextBlob=blob)["Plaintext"])
    finally:
        server.stop()


def test_root_key_in_the_hsm_and_migrations(softhsm: SoftHsm, tmp_path: Path, store_url: str | None) -> None:
    label = softhsm.init_token(pin=PIN)
    data = tmp_path / "data"
    hsm_env = {**bootstrap_env(), "OPENKMS_ROOT_PKCS11_PIN": PIN}
    first = ServerProcess(data, storage_url=store_url, env=hsm_env, extra_args=pkcs11_flags(softhsm, label))
    first.start()
    try:
        kms = first.client()
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]
        blob = kms.encrypt(KeyId=key_id, Plaintext=b"sealed under an HSM-held root")["CiphertextBlob"]
    finally:
        first.stop()
    # Only the wrapped root key is stored; the token holds the wrapping key, which cannot be read.
    assert not (data / "root.key").exists()
    listing = softhsm.tool(label, PIN, "--list-objects", "--type", "secrkey").stdout
    assert "label:      openkms-root" in listing and "never extractable" in listing and "sensitive" in listing
    assert softhsm.tool(label, PIN, "--read-object", "--type", "secrkey", "--label", "openkms-root").returncode != 0

    # Restarts unwrap it in the token.
    again = ServerProcess(data, storage_url=store_url, env={"OPENKMS_ROOT_PKCS11_PIN": PIN},
                          extra_args=pkcs11_flags(softhsm, label))
    assert decrypts(again, blob) == b"sealed under an HSM-held root"

    # Without the token, or with a wrong PIN, the start fails at once and changes nothing.
    before = tree_digest(data)
    for env, args in (({"OPENKMS_ROOT_PKCS11_PIN": PIN}, pkcs11_flags(softhsm, "no-such-token")),
                      ({"OPENKMS_ROOT_PKCS11_PIN": "wrong-pin-1"}, pkcs11_flags(softhsm, label)),
                      ({}, pkcs11_flags(softhsm, label)),  # no PIN
                      ({}, [])):  # as if it had a root key file
        line = refused(ServerProcess(data, storage_url=store_url, env=env, extra_args=args))
        assert PIN not in line and "wrong-pin-1" not in line
    assert tree_digest(data) == before

    # To a file: the root key lands in root.key, and the token no longer opens the store.
    done = migrate(data, store_url, "file", *pkcs11_flags(softhsm, label), OPENKMS_ROOT_PKCS11_PIN=PIN)
    assert done.returncode == 0, done.stderr
    assert (data / "root.key").stat().st_mode & 0o777 == 0o600
    assert decrypts(ServerProcess(data, storage_url=store_url), blob) == b"sealed under an HSM-held root"
    refused(ServerProcess(data, storage_url=store_url, env={"OPENKMS_ROOT_PKCS11_PIN": PIN},
                          extra_args=pkcs11_flags(softhsm, label)))

    # To a passphrase: root.key is deleted; the passphrase opens the store, a wrong one does not.
    done = migrate(data, store_url, "passphrase", OPENKMS_NEW_ROOT_PASSPHRASE="a long passphrase")
    assert done.returncode == 0, done.stderr
    assert not (data / "root.key").exists()
    passphrase = {"OPENKMS_ROOT_PASSPHRASE": "a long passphrase"}
    assert decrypts(ServerProcess(data, storage_url=store_url, env=passphrase), blob) == \
        b"sealed under an HSM-held root"
    refused(ServerProcess(data, storage_url=store_url, env={"OPENKMS_ROOT_PASSPHRASE": "another one"}))

    # And back into the token, under another wrapping key.
    done = migrate(data, store_url, "pkcs11", *pkcs11_flags(softhsm, label, "second", prefix="pkcs11"),
                   **passphrase, OPENKMS_NEW_ROOT_PKCS11_PIN=PIN)
    assert done.returncode == 0, done.stderr
    back = ServerProcess(data, storage_url=store_url, env={"OPENKMS_ROOT_PKCS11_PIN": PIN},
                         extra_args=pkcs11_flags(softhsm, label, "second"))
    assert decrypts(back, blob) == b"sealed under an HSM-held root"
    refused(ServerProcess(data, storage_url=store_url, env=passphrase))


def test_migrate_refuses_while_the_server_runs_and_says_why(softhsm: SoftHsm, tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, env=bootstrap_env())
    server.start()
    try:
        busy = migrate(data, None, "passphrase", OPENKMS_NEW_ROOT_PASSPHRASE="x" * 20)
        assert busy.returncode == 2 and "in use by another openkms server" in busy.stderr, busy.stderr
    finally:
        server.stop()
    for target, env, why in (("passphrase", {}, "OPENKMS_NEW_ROOT_PASSPHRASE"),
                             ("pkcs11", {}, "--pkcs11-module"),
                             ("file", {}, "already comes from a file source")):
        out = migrate(data, None, target, **env)
        assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert migrate(tmp_path / "nothing", None, "file").returncode == 2

