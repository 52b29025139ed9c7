"""The root key in an HSM token (SoftHSM2), and moving the root key between sources, through real
`openkms serve` and `openkms root migrate` processes.

First start with --root-pkcs11-*: the token holds a non-extractable AES key that wraps the root key,
the store only the wrapped root key, no root.key file exists; restarts unwrap it in the token;
without the token the start fails at once with one line and changes nothing; `openkms root
migrate` moves the root key to a file, a passphrase and back to a token, and what was encrypted
first still decrypts at every step, while the old source stops opening the store. A token key that
cannot give the root key back (one that may encrypt but not decrypt) is refused before anything is
recorded, by `migrate` and by a first start alike, and a failure on the way says so in one line.
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


def encrypt_only_key(hsm: SoftHsm, label: str, key_label: str = "openkms-root") -> None:
    """An AES-256 key that may encrypt but not decrypt (CKA_DECRYPT false), made as an operator
    might by mistake; pkcs11-tool cannot make one, so python-pkcs11 does, in a process of its own."""
    script = (
        "import sys, pkcs11\n"
        "module, token, pin, label = sys.argv[1:]\n"
        "a = pkcs11.Attribute\n"
        "with pkcs11.lib(module).get_token(token_label=token).open(user_pin=pin, rw=True) as s:\n"
        "    s.generate_key(pkcs11.KeyType.AES, 256, label=label, store=True, template={\n"
        "        a.TOKEN: True, a.PRIVATE: True, a.SENSITIVE: True, a.EXTRACTABLE: False,\n"
        "        a.ENCRYPT: True, a.DECRYPT: False})\n")
    subprocess.run([sys.executable, "-c", script, hsm.module, label, PIN, key_label], env={**os.environ, **hsm.env()},
                   check=True, capture_output=True, timeout=60)


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr and PIN not in out.stderr, out.stderr
    return lines[0]


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


def test_migrate_refuses_a_token_key_that_cannot_unwrap(softhsm: SoftHsm, tmp_path: Path,
                                                        store_url: str | None) -> None:
    label = softhsm.init_token(pin=PIN)
    encrypt_only_key(softhsm, label)
    data = tmp_path / "data"
    server = ServerProcess(data, storage_url=store_url, env=bootstrap_env())  # a root key file
    server.start()
    try:
        kms = server.client()
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]
        blob = kms.encrypt(KeyId=key_id, Plaintext=b"sealed under a root key file")["CiphertextBlob"]
    finally:
        server.stop()
    before = tree_digest(data)

    # The token wraps the root key but cannot unwrap it: refused before the store is changed, and
    # root.key is kept (it was shredded, and the store lost for good).
    out = migrate(data, store_url, "pkcs11", *pkcs11_flags(softhsm, label, prefix="pkcs11"),
                  OPENKMS_NEW_ROOT_PKCS11_PIN=PIN)
    line = one_line(out)
    assert out.returncode == 2 and "does not give the root key back" in line and "nothing was changed" in line, line
    assert (data / "root.key").exists() and tree_digest(data) == before
    assert decrypts(ServerProcess(data, storage_url=store_url), blob) == b"sealed under a root key file"
    refused(ServerProcess(data, storage_url=store_url, env={"OPENKMS_ROOT_PKCS11_PIN": PIN},
                          extra_args=pkcs11_flags(softhsm, label)))


def test_a_token_key_that_cannot_unwrap_stops_a_start_in_one_line(softhsm: SoftHsm, tmp_path: Path) -> None:
    label = softhsm.init_token(pin=PIN)
    encrypt_only_key(softhsm, label)
    hsm_env = {**bootstrap_env(), "OPENKMS_ROOT_PKCS11_PIN": PIN}
    data = tmp_path / "data"

    # A first start with it records nothing (it recorded a root key no start could unwrap) ...
    line = refused(ServerProcess(data, env=hsm_env, extra_args=pkcs11_flags(softhsm, label)))
    assert "cannot wrap and unwrap the root key" in line, line
    # ... so the store can still be made with a good key.
    good = ServerProcess(data, env=hsm_env, extra_args=pkcs11_flags(softhsm, label, "good"))
    good.start()
    good.stop()

    # A token whose key was replaced by one that cannot decrypt: one line, not a traceback.
    deleted = softhsm.tool(label, PIN, "--delete-object", "--type", "secrkey", "--label", "good")
    assert deleted.returncode == 0, deleted.stderr
    encrypt_only_key(softhsm, label, "good")
    line = refused(ServerProcess(data, env={"OPENKMS_ROOT_PKCS11_PIN": PIN},
                                 extra_args=pkcs11_flags(softhsm, label, "good")))
    assert "cannot wrap and unwrap the root key" in line and PIN not in line, line


def test_a_failing_migration_says_so_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    passphrase = {"OPENKMS_ROOT_PASSPHRASE": "a long passphrase"}
    server = ServerProcess(data, env={**bootstrap_env(), **passphrase})
    server.start()
    try:
        kms = server.client()
        blob = kms.encrypt(KeyId=kms.create_key()["KeyMetadata"]["KeyId"], Plaintext=b"kept")["CiphertextBlob"]
    finally:
        server.stop()
    before = tree_digest(data)
    (data / "root.tmp").mkdir()  # where root.key is written before it is renamed into place
    out = migrate(data, None, "file", **passphrase)
    line = one_line(out)
    assert out.returncode == 2 and line.startswith("openkms root migrate: ") and "root.tmp" in line, line
    assert not (data / "root.key").exists() and tree_digest(data) == before
    assert decrypts(ServerProcess(data, env=passphrase), blob) == b"kept"
