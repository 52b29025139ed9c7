"""Asymmetric and HMAC keys through boto3, checked OUTSIDE openkms with openssl and pyca/cryptography."""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from openkms.crypto.asymmetric import ML_DSA_SUPPORTED

RSA_SIGN = [f"RSASSA_{p}_SHA_{n}" for p in ("PSS", "PKCS1_V1_5") for n in (256, 384, 512)]
HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def code(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


def openssl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], input=input, capture_output=True, timeout=30)


def public_pem(kms: Any, key_id: str, tmp_path: Path) -> Path:
    """GetPublicKey's DER, turned into PEM by openssl the way a customer would."""
    der = tmp_path / f"{key_id}.der"
    der.write_bytes(kms.get_public_key(KeyId=key_id)["PublicKey"])
    pem = tmp_path / f"{key_id}.pem"
    result = openssl("pkey", "-pubin", "-inform", "DER", "-in", str(der), "-out", str(pem))
    assert result.returncode == 0, result.stderr
    return pem


@pytest.fixture(scope="module")
def keys(kms: Any) -> dict[str, str]:
    """One key per (spec, usage) the tests need, made once per server."""
    made = {}
    for spec, usage in [("RSA_2048", "SIGN_VERIFY"), ("RSA_2048", "ENCRYPT_DECRYPT"), ("RSA_3072", "ENCRYPT_DECRYPT"),
                        ("ECC_NIST_P256", "SIGN_VERIFY"), ("ECC_NIST_P384", "SIGN_VERIFY"),
                        ("ECC_NIST_P521", "SIGN_VERIFY"), ("ECC_SECG_P256K1", "SIGN_VERIFY"),
                        ("ECC_NIST_EDWARDS25519", "SIGN_VERIFY"), ("ECC_NIST_P256", "KEY_AGREEMENT"),
                        ("ECC_NIST_P384", "KEY_AGREEMENT"), ("HMAC_224", "GENERATE_VERIFY_MAC"),
                        ("HMAC_256", "GENERATE_VERIFY_MAC"), ("HMAC_384", "GENERATE_VERIFY_MAC"),
                        ("HMAC_512", "GENERATE_VERIFY_MAC")]:
        made[f"{spec}/{usage}"] = kms.create_key(KeySpec=spec, KeyUsage=usage)["KeyMetadata"]["KeyId"]
    made["SYMMETRIC"] = kms.create_key()["KeyMetadata"]["KeyId"]
    return made


# -- CreateKey and DescribeKey --------------------------------------------------------------------

@pytest.mark.parametrize("spec,usage,field,algorithms", [
    ("RSA_2048", "SIGN_VERIFY", "SigningAlgorithms", RSA_SIGN),
    ("RSA_2048", "ENCRYPT_DECRYPT", "EncryptionAlgorithms", ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]),
    ("ECC_NIST_P256", "SIGN_VERIFY", "SigningAlgorithms", ["ECDSA_SHA_256"]),
    ("ECC_NIST_P384", "SIGN_VERIFY", "SigningAlgorithms", ["ECDSA_SHA_384"]),
    ("ECC_NIST_P521", "SIGN_VERIFY", "SigningAlgorithms", ["ECDSA_SHA_512"]),
    ("ECC_SECG_P256K1", "SIGN_VERIFY", "SigningAlgorithms", ["ECDSA_SHA_256"]),
    ("ECC_NIST_P256", "KEY_AGREEMENT", "KeyAgreementAlgorithms", ["ECDH"]),
    ("ECC_NIST_EDWARDS25519", "SIGN_VERIFY", "SigningAlgorithms", ["ED25519_SHA_512"]),
    ("HMAC_256", "GENERATE_VERIFY_MAC", "MacAlgorithms", ["HMAC_SHA_256"]),
    ("HMAC_512", "GENERATE_VERIFY_MAC", "MacAlgorithms", ["HMAC_SHA_512"]),
])
def test_describe_reports_algorithms(kms: Any, keys: dict[str, str], spec: str, usage: str, field: str,
                                     algorithms: list[str]) -> None:
    md = kms.describe_key(KeyId=keys[f"{spec}/{usage}"])["KeyMetadata"]
    assert md["KeySpec"] == spec and md["KeyUsage"] == usage
    assert md[field] == algorithms
    others = {"SigningAlgorithms", "EncryptionAlgorithms", "MacAlgorithms", "KeyAgreementAlgorithms"} - {field}
    assert not others & set(md)


@pytest.mark.parametrize("spec,usage", [
    ("ECC_NIST_P256", "ENCRYPT_DECRYPT"), ("ECC_SECG_P256K1", "KEY_AGREEMENT"),
    ("ECC_NIST_EDWARDS25519", "ENCRYPT_DECRYPT"), ("RSA_2048", "GENERATE_VERIFY_MAC"),
    ("RSA_2048", "KEY_AGREEMENT"), ("HMAC_256", "SIGN_VERIFY"), ("SYMMETRIC_DEFAULT", "SIGN_VERIFY"),
])
def test_create_key_rejects_incompatible_usage(kms: Any, spec: str, usage: str) -> None:
    with pytest.raises(ClientError) as e:
        kms.create_key(KeySpec=spec, KeyUsage=usage)
    assert code(e) == "ValidationException"


def test_hmac_key_needs_its_usage(kms: Any) -> None:
    with pytest.raises(ClientError) as e:
        kms.create_key(KeySpec="HMAC_256")  # KeyUsage defaults to ENCRYPT_DECRYPT, as in AWS
    assert code(e) == "ValidationException"


# -- Sign / Verify, checked with openssl and pyca -------------------------------------------------

@pytest.mark.parametrize("spec,algorithm", [("RSA_2048", a) for a in RSA_SIGN] + [
    ("ECC_NIST_P256", "ECDSA_SHA_256"), ("ECC_NIST_P384", "ECDSA_SHA_384"), ("ECC_NIST_P521", "ECDSA_SHA_512"),
    ("ECC_SECG_P256K1", "ECDSA_SHA_256")])
def test_signatures_verify_with_openssl_and_pyca(kms: Any, keys: dict[str, str], tmp_path: Path, spec: str,
                                                 algorithm: str) -> None:
    key_id = keys[f"{spec}/SIGN_VERIFY"]
    message = os.urandom(300)
    out = kms.sign(KeyId=key_id, Message=message, SigningAlgorithm=algorithm)
    assert out["SigningAlgorithm"] == algorithm and out["KeyId"].endswith(key_id)
    signature = out["Signature"]
    pem = public_pem(kms, key_id, tmp_path)
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "sig").write_bytes(signature)
    digest = algorithm.rsplit("_", 1)[1]
    args = ["dgst", f"-sha{digest}", "-verify", str(pem), "-signature", str(tmp_path / "sig")]
    if "PSS" in algorithm:
        args += ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:-1"]
    result = openssl(*args, str(tmp_path / "msg"))
    assert result.returncode == 0 and b"Verified OK" in result.stdout, result.stderr
    (tmp_path / "msg").write_bytes(message + b"!")
    assert openssl(*args, str(tmp_path / "msg")).returncode != 0

    public = serialization.load_pem_public_key(pem.read_bytes())
    h = HASH[digest]()
    if isinstance(public, rsa.RSAPublicKey):
        pad = (padding.PSS(mgf=padding.MGF1(HASH[digest]()), salt_length=h.digest_size)
               if "PSS" in algorithm else padding.PKCS1v15())
        public.verify(signature, message, pad, h)
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, message, ec.ECDSA(h))


def test_ed25519_verifies_with_openssl(kms: Any, keys: dict[str, str], tmp_path: Path) -> None:
    key_id = keys["ECC_NIST_EDWARDS25519/SIGN_VERIFY"]
    message = b"release v1.2.3"
    signature = kms.sign(KeyId=key_id, Message=message, SigningAlgorithm="ED25519_SHA_512")["Signature"]
    assert len(signature) == 64
    pem = public_pem(kms, key_id, tmp_path)
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "sig").write_bytes(signature)
    result = openssl("pkeyutl", "-verify", "-pubin", "-inkey", str(pem), "-rawin", "-in", str(tmp_path / "msg"),
                     "-sigfile", str(tmp_path / "sig"))
    assert result.returncode == 0 and b"Signature Verified Successfully" in result.stdout, result.stderr
    with pytest.raises(ClientError) as e:
        kms.sign(KeyId=key_id, Message=hashlib.sha512(message).digest(), MessageType="DIGEST",
                 SigningAlgorithm="ED25519_SHA_512")
    assert code(e) == "ValidationException"


@pytest.mark.skipif(not ML_DSA_SUPPORTED, reason="the installed cryptography has no ML-DSA")
def test_ml_dsa(kms: Any) -> None:
    from cryptography.hazmat.primitives.asymmetric import mldsa

    key_id = kms.create_key(KeySpec="ML_DSA_44", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    signature = kms.sign(KeyId=key_id, Message=b"pq", SigningAlgorithm="ML_DSA_SHAKE_256")["Signature"]
    public = serialization.load_der_public_key(kms.get_public_key(KeyId=key_id)["PublicKey"])
    assert isinstance(public, mldsa.MLDSA44PublicKey)
    public.verify(signature, b"pq")
    assert kms.verify(KeyId=key_id, Message=b"pq", Signature=signature,
                      SigningAlgorithm="ML_DSA_SHAKE_256")["SignatureValid"] is True


@pytest.mark.parametrize("spec,algorithm", [("ECC_NIST_P256", "ECDSA_SHA_256"), ("RSA_2048", "RSASSA_PSS_SHA_384")])
def test_digest_message_type(kms: Any, keys: dict[str, str], spec: str, algorithm: str) -> None:
    key_id = keys[f"{spec}/SIGN_VERIFY"]
    digest_bits = algorithm.rsplit("_", 1)[1]
    message = b"a document"
    digest = hashlib.new(f"sha{digest_bits}", message).digest()
    signature = kms.sign(KeyId=key_id, Message=digest, MessageType="DIGEST", SigningAlgorithm=algorithm)["Signature"]
    # A signature over the digest is a signature over the message ...
    assert kms.verify(KeyId=key_id, Message=message, MessageType="RAW", Signature=signature,
                      SigningAlgorithm=algorithm)["SignatureValid"] is True
    public = serialization.load_der_public_key(kms.get_public_key(KeyId=key_id)["PublicKey"])
    h = HASH[digest_bits]()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, digest, ec.ECDSA(utils.Prehashed(h)))
    # ... and a digest of the wrong length is refused.
    with pytest.raises(ClientError) as e:
        kms.sign(KeyId=key_id, Message=digest[:-1], MessageType="DIGEST", SigningAlgorithm=algorithm)
    assert code(e) == "ValidationException"


def test_verify_rejects_bad_signatures(kms: Any, keys: dict[str, str]) -> None:
    key_id = keys["ECC_NIST_P256/SIGN_VERIFY"]
    signature = kms.sign(KeyId=key_id, Message=b"m", SigningAlgorithm="ECDSA_SHA_256")["Signature"]
    other = keys["ECC_SECG_P256K1/SIGN_VERIFY"]
    for kwargs in ({"KeyId": key_id, "Message": b"n", "Signature": signature},
                   {"KeyId": key_id, "Message": b"m", "Signature": signature[:-1] + bytes([signature[-1] ^ 1])},
                   {"KeyId": key_id, "Message": b"m", "Signature": b"\x00" * 10},
                   {"KeyId": other, "Message": b"m", "Signature": signature}):
        with pytest.raises(ClientError) as e:
            kms.verify(SigningAlgorithm="ECDSA_SHA_256", **kwargs)
        assert code(e) == "KMSInvalidSignatureException"


def test_signing_algorithm_must_fit_the_key(kms: Any, keys: dict[str, str]) -> None:
    with pytest.raises(ClientError) as e:
        kms.sign(KeyId=keys["ECC_NIST_P256/SIGN_VERIFY"], Message=b"m", SigningAlgorithm="ECDSA_SHA_384")
    assert code(e) == "InvalidKeyUsageException"
    with pytest.raises(ClientError) as e:
        kms.sign(KeyId=keys["RSA_2048/SIGN_VERIFY"], Message=b"m", SigningAlgorithm="ECDSA_SHA_256")
    assert code(e) == "InvalidKeyUsageException"


# -- RSA encryption -------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm,md", [("RSAES_OAEP_SHA_1", "sha1"), ("RSAES_OAEP_SHA_256", "sha256")])
def test_openssl_encrypts_openkms_decrypts(kms: Any, keys: dict[str, str], tmp_path: Path, algorithm: str,
                                           md: str) -> None:
    key_id = keys["RSA_3072/ENCRYPT_DECRYPT"]
    pem = public_pem(kms, key_id, tmp_path)
    plaintext = os.urandom(64)
    (tmp_path / "pt").write_bytes(plaintext)
    result = openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", str(pem), "-pkeyopt", "rsa_padding_mode:oaep",
                     "-pkeyopt", f"rsa_oaep_md:{md}", "-pkeyopt", f"rsa_mgf1_md:{md}",
                     "-in", str(tmp_path / "pt"), "-out", str(tmp_path / "ct"))
    assert result.returncode == 0, result.stderr
    out = kms.decrypt(KeyId=key_id, CiphertextBlob=(tmp_path / "ct").read_bytes(), EncryptionAlgorithm=algorithm)
    assert out["Plaintext"] == plaintext and out["EncryptionAlgorithm"] == algorithm
    other = "RSAES_OAEP_SHA_256" if algorithm == "RSAES_OAEP_SHA_1" else "RSAES_OAEP_SHA_1"
    with pytest.raises(ClientError) as e:
        kms.decrypt(KeyId=key_id, CiphertextBlob=(tmp_path / "ct").read_bytes(), EncryptionAlgorithm=other)
    assert code(e) == "InvalidCiphertextException"


@pytest.mark.parametrize("algorithm,limit", [("RSAES_OAEP_SHA_1", 214), ("RSAES_OAEP_SHA_256", 190)])
def test_rsa_plaintext_limits(kms: Any, keys: dict[str, str], algorithm: str, limit: int) -> None:
    key_id = keys["RSA_2048/ENCRYPT_DECRYPT"]
    ct = kms.encrypt(KeyId=key_id, Plaintext=b"p" * limit, EncryptionAlgorithm=algorithm)["CiphertextBlob"]
    assert len(ct) == 256
    assert kms.decrypt(KeyId=key_id, CiphertextBlob=ct, EncryptionAlgorithm=algorithm)["Plaintext"] == b"p" * limit
    with pytest.raises(ClientError) as e:
        kms.encrypt(KeyId=key_id, Plaintext=b"p" * (limit + 1), EncryptionAlgorithm=algorithm)
    assert code(e) == "ValidationException"


def test_rsa_encryption_rules(kms: Any, keys: dict[str, str]) -> None:
    key_id = keys["RSA_2048/ENCRYPT_DECRYPT"]
    with pytest.raises(ClientError) as e:  # asymmetric keys need an explicit algorithm
        kms.encrypt(KeyId=key_id, Plaintext=b"x")
    assert code(e) == "InvalidKeyUsageException"
    with pytest.raises(ClientError) as e:
        kms.encrypt(KeyId=key_id, Plaintext=b"x", EncryptionAlgorithm="RSAES_OAEP_SHA_256",
                    EncryptionContext={"a": "b"})
    assert code(e) == "ValidationException"
    ct = kms.encrypt(KeyId=key_id, Plaintext=b"x", EncryptionAlgorithm="RSAES_OAEP_SHA_256")["CiphertextBlob"]
    with pytest.raises(ClientError) as e:  # the RSA ciphertext does not name its key
        kms.decrypt(CiphertextBlob=ct, EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    assert code(e) == "InvalidCiphertextException"
    moved = kms.re_encrypt(CiphertextBlob=ct, SourceKeyId=key_id, SourceEncryptionAlgorithm="RSAES_OAEP_SHA_256",
                           DestinationKeyId=keys["SYMMETRIC"])
    assert moved["SourceEncryptionAlgorithm"] == "RSAES_OAEP_SHA_256"
    assert kms.decrypt(CiphertextBlob=moved["CiphertextBlob"])["Plaintext"] == b"x"


# -- HMAC -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [224, 256, 384, 512])
def test_mac_round_trip(kms: Any, keys: dict[str, str], bits: int) -> None:
    key_id = keys[f"HMAC_{bits}/GENERATE_VERIFY_MAC"]
    algorithm = f"HMAC_SHA_{bits}"
    message = os.urandom(1000)
    out = kms.generate_mac(KeyId=key_id, Message=message, MacAlgorithm=algorithm)
    assert len(out["Mac"]) == bits // 8 and out["MacAlgorithm"] == algorithm
    assert out["Mac"] == kms.generate_mac(KeyId=key_id, Message=message, MacAlgorithm=algorithm)["Mac"]
    assert kms.verify_mac(KeyId=key_id, Message=message, Mac=out["Mac"], MacAlgorithm=algorithm)["MacValid"] is True
    for bad in ({"Message": message + b"x", "Mac": out["Mac"]},
                {"Message": message, "Mac": bytes([out["Mac"][0] ^ 1]) + out["Mac"][1:]},
                {"Message": message, "Mac": out["Mac"][:-1]}):
        with pytest.raises(ClientError) as e:
            kms.verify_mac(KeyId=key_id, MacAlgorithm=algorithm, **bad)
        assert code(e) == "KMSInvalidMacException"


def test_mac_under_another_key_fails(kms: Any, keys: dict[str, str]) -> None:
    a = keys["HMAC_256/GENERATE_VERIFY_MAC"]
    b = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
    mac = kms.generate_mac(KeyId=a, Message=b"m", MacAlgorithm="HMAC_SHA_256")["Mac"]
    assert mac != kms.generate_mac(KeyId=b, Message=b"m", MacAlgorithm="HMAC_SHA_256")["Mac"]
    with pytest.raises(ClientError) as e:
        kms.verify_mac(KeyId=b, Message=b"m", Mac=mac, MacAlgorithm="HMAC_SHA_256")
    assert code(e) == "KMSInvalidMacException"
    with pytest.raises(ClientError) as e:
        kms.generate_mac(KeyId=a, Message=b"m", MacAlgorithm="HMAC_SHA_384")
    assert code(e) == "InvalidKeyUsageException"


# -- key agreement --------------------------------------------------------------------------------

def test_derive_shared_secret(kms: Any, keys: dict[str, str]) -> None:
    key_id = keys["ECC_NIST_P256/KEY_AGREEMENT"]
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_der = peer.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    out = kms.derive_shared_secret(KeyId=key_id, KeyAgreementAlgorithm="ECDH", PublicKey=peer_der)
    kms_public = serialization.load_der_public_key(kms.get_public_key(KeyId=key_id)["PublicKey"])
    assert isinstance(kms_public, ec.EllipticCurvePublicKey)
    assert out["SharedSecret"] == peer.exchange(ec.ECDH(), kms_public)
    assert out["KeyAgreementAlgorithm"] == "ECDH" and out["KeyOrigin"] == "AWS_KMS"
    wrong_curve = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for bad in (wrong_curve, b"not a key"):
        with pytest.raises(ClientError) as e:
            kms.derive_shared_secret(KeyId=key_id, KeyAgreementAlgorithm="ECDH", PublicKey=bad)
        assert code(e) == "ValidationException"


# -- data key pairs -------------------------------------------------------------------------------

@pytest.mark.parametrize("pair_spec", ["RSA_2048", "ECC_NIST_P256", "ECC_NIST_P521", "ECC_SECG_P256K1",
                                       "ECC_NIST_EDWARDS25519"])
def test_generate_data_key_pair(kms: Any, keys: dict[str, str], pair_spec: str) -> None:
    out = kms.generate_data_key_pair(KeyId=keys["SYMMETRIC"], KeyPairSpec=pair_spec,
                                     EncryptionContext={"use": "pair"})
    assert out["KeyPairSpec"] == pair_spec
    private_der = kms.decrypt(CiphertextBlob=out["PrivateKeyCiphertextBlob"],
                              EncryptionContext={"use": "pair"})["Plaintext"]
    assert private_der == out["PrivateKeyPlaintext"]
    private = serialization.load_der_private_key(private_der, password=None)
    assert private.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo) == out["PublicKey"]
    bare = kms.generate_data_key_pair_without_plaintext(KeyId=keys["SYMMETRIC"], KeyPairSpec=pair_spec)
    assert "PrivateKeyPlaintext" not in bare
    private2 = serialization.load_der_private_key(
        kms.decrypt(CiphertextBlob=bare["PrivateKeyCiphertextBlob"])["Plaintext"], password=None)
    assert private2.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo) == bare["PublicKey"]


# -- wrong purpose --------------------------------------------------------------------------------

def test_wrong_purpose_is_invalid_key_usage(kms: Any, keys: dict[str, str]) -> None:
    calls = [
        lambda: kms.encrypt(KeyId=keys["RSA_2048/SIGN_VERIFY"], Plaintext=b"x",
                            EncryptionAlgorithm="RSAES_OAEP_SHA_256"),
        lambda: kms.sign(KeyId=keys["SYMMETRIC"], Message=b"x", SigningAlgorithm="ECDSA_SHA_256"),
        lambda: kms.sign(KeyId=keys["RSA_2048/ENCRYPT_DECRYPT"], Message=b"x", SigningAlgorithm="RSASSA_PSS_SHA_256"),
        lambda: kms.generate_mac(KeyId=keys["SYMMETRIC"], Message=b"x", MacAlgorithm="HMAC_SHA_256"),
        lambda: kms.generate_mac(KeyId=keys["ECC_NIST_P256/SIGN_VERIFY"], Message=b"x", MacAlgorithm="HMAC_SHA_256"),
        lambda: kms.generate_data_key(KeyId=keys["RSA_2048/ENCRYPT_DECRYPT"], KeySpec="AES_256"),
        lambda: kms.generate_data_key(KeyId=keys["HMAC_256/GENERATE_VERIFY_MAC"], KeySpec="AES_256"),
        lambda: kms.encrypt(KeyId=keys["HMAC_256/GENERATE_VERIFY_MAC"], Plaintext=b"x"),
        lambda: kms.derive_shared_secret(KeyId=keys["ECC_NIST_P256/SIGN_VERIFY"], KeyAgreementAlgorithm="ECDH",
                                         PublicKey=b"x"),
        lambda: kms.generate_data_key_pair(KeyId=keys["RSA_2048/ENCRYPT_DECRYPT"], KeyPairSpec="ECC_NIST_P256"),
    ]
    for call in calls:
        with pytest.raises(ClientError) as e:
            call()
        assert code(e) == "InvalidKeyUsageException"


def test_get_public_key(kms: Any, keys: dict[str, str]) -> None:
    out = kms.get_public_key(KeyId=keys["RSA_2048/ENCRYPT_DECRYPT"])
    assert out["KeySpec"] == "RSA_2048" and out["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert out["EncryptionAlgorithms"] == ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]
    public = serialization.load_der_public_key(out["PublicKey"])
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    for key in (keys["SYMMETRIC"], keys["HMAC_256/GENERATE_VERIFY_MAC"]):
        with pytest.raises(ClientError) as e:
            kms.get_public_key(KeyId=key)
        assert code(e) == "UnsupportedOperationException"
    kms.disable_key(KeyId=keys["ECC_NIST_P384/SIGN_VERIFY"])
    try:
        with pytest.raises(ClientError) as e:
            kms.sign(KeyId=keys["ECC_NIST_P384/SIGN_VERIFY"], Message=b"x", SigningAlgorithm="ECDSA_SHA_384")
        assert code(e) == "DisabledException"
    finally:
        kms.enable_key(KeyId=keys["ECC_NIST_P384/SIGN_VERIFY"])


# -- material at rest -----------------------------------------------------------------------------

def stored_material(server: Any, key_id: str) -> bytes:
    """The sealed_material row of a key, read straight from the store (SQLite or PostgreSQL)."""
    sql = "select sealed_material from key_versions where key_id = {}"
    if server.storage_url is None:
        with sqlite3.connect(server.data_dir / "openkms.db") as conn:
            return bytes(conn.execute(sql.format("?"), (key_id,)).fetchone()[0])
    import psycopg

    with psycopg.connect(server.storage_url) as conn:
        return bytes(conn.execute(sql.format("%s"), (key_id,)).fetchone()[0])  # type: ignore[index]


def test_private_keys_are_sealed_under_the_root_key(server: Any, keys: dict[str, str]) -> None:
    """The stored row opens only with the root key, and what it holds is the key GetPublicKey shows."""
    from openkms.crypto.root import load_key_file
    from openkms.keystore.software import material_aad

    root = load_key_file(server.data_dir / "root.key", create=False)
    key_id = keys["ECC_NIST_P256/SIGN_VERIFY"]
    sealed = stored_material(server, key_id)
    private_der = root.unseal(sealed, material_aad(key_id, 1))
    assert private_der not in sealed
    if server.storage_url is None:
        assert private_der not in b"".join(p.read_bytes() for p in server.data_dir.glob("openkms.db*"))
    private = serialization.load_der_private_key(private_der, password=None)
    kms_public = server.client().get_public_key(KeyId=key_id)["PublicKey"]
    assert private.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo) == kms_public
    hmac_id = keys["HMAC_256/GENERATE_VERIFY_MAC"]
    hmac_key = root.unseal(stored_material(server, hmac_id), material_aad(hmac_id, 1))
    mac = server.client().generate_mac(KeyId=hmac_id, Message=b"abc", MacAlgorithm="HMAC_SHA_256")["Mac"]
    assert mac == hmac.digest(hmac_key, b"abc", "sha256")
