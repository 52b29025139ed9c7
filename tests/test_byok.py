"""BYOK: import of customer key material, driven the way customers do it (AWS CLI + openssl)."""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from openkms.client.byok import wrap_key_material
from openkms.crypto import blob
from tests.server import REGION

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_1", "RSA_AES_KEY_WRAP_SHA_256"]


def code(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


def readme_block(name: str) -> str:
    """The shell code block after `<!-- byok:NAME -->` in the README, exactly as customers read it."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- byok:{re.escape(name)} -->\s*```sh\n(.*?)```", text, re.S)
    assert m, f"README has no byok:{name} block"
    return m.group(1)


def cli_env(server: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    bin_dir = str(Path(sys.executable).parent)  # the `aws` of this environment
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '')}", AWS_ACCESS_KEY_ID=server.access_key_id,
               AWS_SECRET_ACCESS_KEY=server.secret_access_key, AWS_DEFAULT_REGION=REGION,
               AWS_ENDPOINT_URL_KMS=server.endpoint, AWS_MAX_ATTEMPTS="1",
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return env


def fresh_key_material_import(kms: Any, key_id: str, material: bytes, algorithm: str = "RSAES_OAEP_SHA_256",
                              **kwargs: Any) -> dict[str, Any]:
    params = kms.get_parameters_for_import(KeyId=key_id, WrappingAlgorithm=algorithm, WrappingKeySpec="RSA_2048")
    wrapped = wrap_key_material(params["PublicKey"], algorithm, material)
    kwargs.setdefault("ExpirationModel", "KEY_MATERIAL_DOES_NOT_EXPIRE")
    return kms.import_key_material(KeyId=key_id, ImportToken=params["ImportToken"],  # type: ignore[no-any-return]
                                   EncryptedKeyMaterial=wrapped, **kwargs)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_readme_walkthrough_with_aws_cli_and_openssl(server: Any, tmp_path: Path, algorithm: str) -> None:
    md = "sha1" if algorithm.endswith("SHA_1") else "sha256"
    customer = readme_block("customer-aes-key-wrap" if "AES_KEY_WRAP" in algorithm else "customer-oaep")
    script = "\n".join([
        "set -euo pipefail",
        readme_block("owner-prepare").replace("RSAES_OAEP_SHA_256", algorithm),
        customer.replace("sha256", md),
        readme_block("owner-import"),
        'echo "$KEY_ID" > key_id.txt',
    ])
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=cli_env(server), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("Enabled")
    key_id = (tmp_path / "key_id.txt").read_text().strip()
    material = (tmp_path / "key.bin").read_bytes()
    kms = server.client()
    md_ = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert md_["Origin"] == "EXTERNAL" and md_["ExpirationModel"] == "KEY_MATERIAL_DOES_NOT_EXPIRE"
    ct = kms.encrypt(KeyId=key_id, Plaintext=b"imported", EncryptionContext={"a": "b"})["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=ct, EncryptionContext={"a": "b"})["Plaintext"] == b"imported"
    # The material in use is exactly the customer's key.bin: the blob opens with it outside openkms.
    header = blob.parse_header(ct)
    assert blob.open_blob(material, header, ct, {"a": "b"}) == b"imported"


def test_openkms_byok_wrap_cli(server: Any, tmp_path: Path) -> None:
    kms = server.client()
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    params = kms.get_parameters_for_import(KeyId=key_id, WrappingAlgorithm="RSA_AES_KEY_WRAP_SHA_256",
                                           WrappingKeySpec="RSA_4096")
    (tmp_path / "wrapping.der").write_bytes(params["PublicKey"])
    material = os.urandom(32)
    (tmp_path / "key.bin").write_bytes(material)
    result = subprocess.run([sys.executable, "-m", "openkms.cli.main", "byok", "wrap", "--public-key",
                             str(tmp_path / "wrapping.der"), "--algorithm", "RSA_AES_KEY_WRAP_SHA_256",
                             "--material", str(tmp_path / "key.bin"), "--out", str(tmp_path / "wrapped.bin")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "wrapped.bin").stat().st_mode & 0o077 == 0
    kms.import_key_material(KeyId=key_id, ImportToken=params["ImportToken"],
                            EncryptedKeyMaterial=(tmp_path / "wrapped.bin").read_bytes(),
                            ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    ct = kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    assert blob.open_blob(material, blob.parse_header(ct), ct, None) == b"x"


def test_imported_hmac_key_equals_python_hmac(kms: Any) -> None:
    key_id = kms.create_key(KeySpec="HMAC_384", KeyUsage="GENERATE_VERIFY_MAC",
                            Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    material = os.urandom(60)
    fresh_key_material_import(kms, key_id, material)
    message = os.urandom(100)
    mac = kms.generate_mac(KeyId=key_id, Message=message, MacAlgorithm="HMAC_SHA_384")["Mac"]
    assert mac == hmac.digest(material, message, "sha384")


def test_imported_ec_key_signs_for_the_customers_public_key(kms: Any) -> None:
    key_id = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY", Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    private = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    fresh_key_material_import(kms, key_id, pkcs8, algorithm="RSA_AES_KEY_WRAP_SHA_256")
    signature = kms.sign(KeyId=key_id, Message=b"firmware", SigningAlgorithm="ECDSA_SHA_256")["Signature"]
    private.public_key().verify(signature, b"firmware", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("spec,usage,material", [
    ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", b"\x01" * 31),
    ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", b"\x01" * 33),
    ("HMAC_256", "GENERATE_VERIFY_MAC", b"\x01" * 31),
    ("ECC_NIST_P384", "SIGN_VERIFY", b"not a key"),
])
def test_material_must_fit_the_spec(kms: Any, spec: str, usage: str, material: bytes) -> None:
    key_id = kms.create_key(KeySpec=spec, KeyUsage=usage, Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as e:
        fresh_key_material_import(kms, key_id, material, algorithm="RSA_AES_KEY_WRAP_SHA_256")
    assert code(e) == "IncorrectKeyMaterialException"


def test_wrong_curve_private_key_is_incorrect_material(kms: Any) -> None:
    key_id = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY", Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    other = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(ClientError) as e:
        fresh_key_material_import(kms, key_id, other, algorithm="RSA_AES_KEY_WRAP_SHA_256")
    assert code(e) == "IncorrectKeyMaterialException"


def test_import_errors(server: Any, kms: Any) -> None:
    a = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]
    assert a["KeyState"] == "PendingImport" and a["Enabled"] is False
    b = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as e:
        kms.encrypt(KeyId=a["KeyId"], Plaintext=b"x")
    assert code(e) == "KMSInvalidStateException"
    params = kms.get_parameters_for_import(KeyId=a["KeyId"], WrappingAlgorithm="RSAES_OAEP_SHA_256",
                                           WrappingKeySpec="RSA_2048")
    assert dt.timedelta(hours=23, minutes=59) < params["ParametersValidTo"] - dt.datetime.now(dt.UTC) <= \
        dt.timedelta(hours=24)
    wrapped = wrap_key_material(params["PublicKey"], "RSAES_OAEP_SHA_256", os.urandom(32))
    with pytest.raises(ClientError) as e:  # a token made for another key
        kms.import_key_material(KeyId=b, ImportToken=params["ImportToken"], EncryptedKeyMaterial=wrapped,
                                ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    assert code(e) == "InvalidImportTokenException"
    with pytest.raises(ClientError) as e:
        kms.import_key_material(KeyId=a["KeyId"], ImportToken=os.urandom(40), EncryptedKeyMaterial=wrapped,
                                ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    assert code(e) == "InvalidImportTokenException"
    with pytest.raises(ClientError) as e:  # not wrapped under this token's key
        kms.import_key_material(KeyId=a["KeyId"], ImportToken=params["ImportToken"],
                                EncryptedKeyMaterial=os.urandom(256), ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    assert code(e) == "InvalidCiphertextException"
    with pytest.raises(ClientError) as e:  # ValidTo with a model that does not expire
        kms.import_key_material(KeyId=a["KeyId"], ImportToken=params["ImportToken"], EncryptedKeyMaterial=wrapped,
                                ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
                                ValidTo=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    assert code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:
        kms.import_key_material(KeyId=a["KeyId"], ImportToken=params["ImportToken"], EncryptedKeyMaterial=wrapped,
                                ExpirationModel="KEY_MATERIAL_EXPIRES")
    assert code(e) == "ValidationException"
    normal = kms.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as e:
        kms.get_parameters_for_import(KeyId=normal, WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048")
    assert code(e) == "UnsupportedOperationException"
    with pytest.raises(ClientError) as e:
        kms.enable_key_rotation(KeyId=a["KeyId"])
    assert code(e) == "UnsupportedOperationException"


def test_expired_import_token(server: Any, kms: Any) -> None:
    from tests.conftest import run_sql

    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    params = kms.get_parameters_for_import(KeyId=key_id, WrappingAlgorithm="RSAES_OAEP_SHA_256",
                                           WrappingKeySpec="RSA_2048")
    run_sql(server.data_dir, server.storage_url, ("UPDATE import_tokens SET valid_to = ? WHERE key_id = ?",
                                                  (time.time() - 1, key_id)))
    with pytest.raises(ClientError) as e:
        kms.import_key_material(KeyId=key_id, ImportToken=params["ImportToken"],
                                EncryptedKeyMaterial=wrap_key_material(params["PublicKey"], "RSAES_OAEP_SHA_256",
                                                                       os.urandom(32)),
                                ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    # (After the scheduler purges its row the token still says it expired: tests/unit/test_import_token.py.)
    assert code(e) == "ExpiredImportTokenException"


def test_kill_switch_delete_and_reimport(kms: Any) -> None:
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    material = os.urandom(32)
    first = fresh_key_material_import(kms, key_id, material)
    ct = kms.encrypt(KeyId=key_id, Plaintext=b"customer data")["CiphertextBlob"]
    kms.delete_imported_key_material(KeyId=key_id)
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingImport"
    with pytest.raises(ClientError) as e:
        kms.decrypt(CiphertextBlob=ct)
    assert code(e) == "KMSInvalidStateException"
    with pytest.raises(ClientError) as e:  # only the same material may come back
        fresh_key_material_import(kms, key_id, os.urandom(32))
    assert code(e) == "IncorrectKeyMaterialException"
    again = fresh_key_material_import(kms, key_id, material, algorithm="RSA_AES_KEY_WRAP_SHA_1")
    assert again["KeyMaterialId"] == first["KeyMaterialId"]
    assert kms.decrypt(CiphertextBlob=ct)["Plaintext"] == b"customer data"


def test_expiry_takes_effect_on_time(kms: Any) -> None:
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    material = os.urandom(32)
    valid_to = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    fresh_key_material_import(kms, key_id, material, ExpirationModel="KEY_MATERIAL_EXPIRES", ValidTo=valid_to)
    md = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert md["ExpirationModel"] == "KEY_MATERIAL_EXPIRES"
    assert abs((md["ValidTo"] - valid_to).total_seconds()) < 1
    ct = kms.encrypt(KeyId=key_id, Plaintext=b"short-lived")["CiphertextBlob"]
    while dt.datetime.now(dt.UTC) < valid_to + dt.timedelta(milliseconds=100):
        time.sleep(0.1)
    with pytest.raises(ClientError) as e:
        kms.decrypt(CiphertextBlob=ct)
    assert code(e) == "KMSInvalidStateException"
    fresh_key_material_import(kms, key_id, material)
    assert kms.decrypt(CiphertextBlob=ct)["Plaintext"] == b"short-lived"


def test_new_key_material_and_on_demand_rotation(kms: Any) -> None:
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    m1, m2 = os.urandom(32), os.urandom(32)
    id1 = fresh_key_material_import(kms, key_id, m1, KeyMaterialDescription="first")["KeyMaterialId"]
    ct1 = kms.encrypt(KeyId=key_id, Plaintext=b"one")["CiphertextBlob"]
    with pytest.raises(ClientError) as e:  # nothing to rotate to yet
        kms.rotate_key_on_demand(KeyId=key_id)
    assert code(e) == "KMSInvalidStateException"
    id2 = fresh_key_material_import(kms, key_id, m2, ImportType="NEW_KEY_MATERIAL",
                                    KeyMaterialDescription="second")["KeyMaterialId"]
    listed = kms.list_key_rotations(KeyId=key_id, IncludeKeyMaterial="ALL_KEY_MATERIAL")["Rotations"]
    states = {r["KeyMaterialId"]: r for r in listed}
    assert states[id1]["KeyMaterialState"] == "CURRENT" and states[id2]["KeyMaterialState"] == "PENDING_ROTATION"
    assert states[id2]["ImportState"] == "IMPORTED" and states[id2]["KeyMaterialDescription"] == "second"
    ct_before = kms.encrypt(KeyId=key_id, Plaintext=b"still one")["CiphertextBlob"]
    assert blob.open_blob(m1, blob.parse_header(ct_before), ct_before, None) == b"still one"
    kms.rotate_key_on_demand(KeyId=key_id)
    ct2 = kms.encrypt(KeyId=key_id, Plaintext=b"two")["CiphertextBlob"]
    assert blob.open_blob(m2, blob.parse_header(ct2), ct2, None) == b"two"
    assert kms.decrypt(CiphertextBlob=ct1)["Plaintext"] == b"one"
    rotations = kms.list_key_rotations(KeyId=key_id)["Rotations"]
    assert [(r["KeyMaterialId"], r["KeyMaterialState"], r["RotationType"]) for r in rotations] == [
        (id2, "CURRENT", "ON_DEMAND")]


def all_files_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.rglob("*") if p.is_file())


def test_imported_material_never_on_disk_in_the_clear(server: Any, kms: Any, tmp_path: Path) -> None:
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    material = os.urandom(32)
    fresh_key_material_import(kms, key_id, material, algorithm="RSA_AES_KEY_WRAP_SHA_256")
    kms.encrypt(KeyId=key_id, Plaintext=b"x")
    forms = [material, material.hex().encode(), material.hex().upper().encode(), base64.b64encode(material),
             base64.urlsafe_b64encode(material)]
    stored = all_files_bytes(server.data_dir)
    if server.storage_url:
        pg_dump = shutil.which("pg_dump")
        assert pg_dump, "pg_dump (Debian package postgresql-client) is needed for this test"
        dump = subprocess.run([pg_dump, "--data-only", server.storage_url], capture_output=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        assert key_id.encode() in dump.stdout  # the dump really holds the key's rows
        stored += dump.stdout
    else:
        assert key_id.encode() in stored
    for form in forms:
        assert form not in stored
