"""The AWS Encryption SDK for Python (v4, Material Providers Library keyrings) against openkms.

The SDK's KMS keyring is strict about what KMS answers: its Decrypt step fails with "Invalid
response from KMS Decrypt" unless the response's KeyId is exactly the key ARN the keyring was
built with, and it records GenerateDataKey's / Encrypt's response KeyId in the message as the
encrypted data key's provider info. openkms must therefore return full key ARNs in those
responses; `test_responses_carry_the_key_arn_the_sdk_relies_on` pins that down directly.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

aws_encryption_sdk = pytest.importorskip("aws_encryption_sdk")
pytest.importorskip("aws_cryptographic_material_providers")

from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
from aws_cryptographic_material_providers.mpl.models import (
    CreateAwsKmsDiscoveryKeyringInput,
    CreateAwsKmsKeyringInput,
    CreateMultiKeyringInput,
    DiscoveryFilter,
)
from aws_cryptographic_material_providers.smithygenerated.aws_cryptography_materialproviders.errors import (
    ServiceError as MPLError,
)
from aws_encryption_sdk import CommitmentPolicy
from aws_encryption_sdk.exceptions import AWSEncryptionSDKClientError

from tests.server import ServerProcess

ACCOUNT_ID = "111122223333"
CONTEXT = {"tenant": "t1", "purpose": "test"}

Keyring = Any
# What a failed encrypt or decrypt raises: the SDK wraps most MPL errors, but a keyring's KMS
# error on encrypt comes through as the MPL's own exception.
SDK_ERRORS = (AWSEncryptionSDKClientError, MPLError)


@pytest.fixture(scope="module")
def kms(server: ServerProcess) -> Any:
    return server.client()


@pytest.fixture(scope="module")
def mpl() -> Any:
    return AwsCryptographicMaterialProviders(config=MaterialProvidersConfig())


@pytest.fixture(scope="module")
def esdk() -> Any:
    return aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)


@pytest.fixture
def new_key_arn(kms: Any) -> Callable[[], str]:
    def make() -> str:
        return kms.create_key(Description="encryption sdk test")["KeyMetadata"]["Arn"]  # type: ignore[no-any-return]
    return make


@pytest.fixture
def keyring(mpl: Any, kms: Any) -> Callable[..., Keyring]:
    def make(key_arn: str, client: Any = None) -> Keyring:
        return mpl.create_aws_kms_keyring(input=CreateAwsKmsKeyringInput(kms_key_id=key_arn,
                                                                         kms_client=client or kms))
    return make


@pytest.fixture
def kms_calls(server: ServerProcess) -> Iterator[tuple[Any, list[tuple[str, dict[str, Any]]]]]:
    """A separate boto3 client that records the operations the SDK sends through it."""
    client = server.client()
    calls: list[tuple[str, dict[str, Any]]] = []

    def record(model: Any, params: dict[str, Any], **_: Any) -> None:
        calls.append((model.name, dict(params)))

    client.meta.events.register("before-parameter-build.kms", record)
    yield client, calls


def error_text(exc: BaseException) -> str:
    """Every message in an SDK error, its wrapped MPL error and that one's list of KMS errors."""
    seen: list[str] = []
    visited: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in visited:
            continue
        visited.add(id(e))
        seen.append(f"{type(e).__name__}: {e}")
        if isinstance(e, BaseException):
            stack.extend(a for a in e.args if isinstance(a, BaseException))
            stack.append(e.__cause__ or e.__context__)
        stack.extend(getattr(e, "list", None) or [])
    return "\n".join(seen)


def test_round_trip_100k_with_encryption_context(esdk: Any, keyring: Callable[..., Keyring],
                                                 new_key_arn: Callable[[], str], kms_calls: Any) -> None:
    client, calls = kms_calls
    key_arn = new_key_arn()
    kr = keyring(key_arn, client)
    data = os.urandom(100 * 1024)

    ciphertext, enc_header = esdk.encrypt(source=data, keyring=kr, encryption_context=CONTEXT)
    assert data not in ciphertext
    assert CONTEXT.items() <= enc_header.encryption_context.items()
    # The data key was made by openkms, and the message names the openkms key as its provider.
    assert [op for op, _ in calls] == ["GenerateDataKey"]
    assert calls[0][1]["KeyId"] == key_arn
    assert CONTEXT.items() <= calls[0][1]["EncryptionContext"].items()
    [edk] = enc_header.encrypted_data_keys
    assert edk.key_provider.provider_id == "aws-kms"
    assert edk.key_provider.key_info == key_arn.encode()

    plaintext, dec_header = esdk.decrypt(source=ciphertext, keyring=kr)
    assert plaintext == data
    assert CONTEXT.items() <= dec_header.encryption_context.items()
    assert "aws-crypto-public-key" in dec_header.encryption_context  # the default signed suite
    assert [op for op, _ in calls] == ["GenerateDataKey", "Decrypt"]
    assert calls[1][1]["KeyId"] == key_arn
    assert calls[1][1]["EncryptionContext"] == dec_header.encryption_context

    # The SDK's own check of the stored context against what the caller requires.
    plaintext, _ = esdk.decrypt(source=ciphertext, keyring=kr, encryption_context=CONTEXT)
    assert plaintext == data
    with pytest.raises(SDK_ERRORS):
        esdk.decrypt(source=ciphertext, keyring=kr, encryption_context={"tenant": "t2"})


def test_keyring_for_another_key_cannot_decrypt(esdk: Any, keyring: Callable[..., Keyring],
                                                new_key_arn: Callable[[], str]) -> None:
    ciphertext, _ = esdk.encrypt(source=b"for key one only", keyring=keyring(new_key_arn()),
                                 encryption_context=CONTEXT)
    with pytest.raises(SDK_ERRORS) as info:
        esdk.decrypt(source=ciphertext, keyring=keyring(new_key_arn()))
    assert "No Encrypted Data Keys found to match" in error_text(info.value)


def test_decrypt_fails_while_key_is_disabled(esdk: Any, kms: Any, keyring: Callable[..., Keyring],
                                             new_key_arn: Callable[[], str]) -> None:
    key_arn = new_key_arn()
    kr = keyring(key_arn)
    data = os.urandom(2048)
    ciphertext, _ = esdk.encrypt(source=data, keyring=kr, encryption_context=CONTEXT)

    kms.disable_key(KeyId=key_arn)
    with pytest.raises(SDK_ERRORS) as info:
        esdk.decrypt(source=ciphertext, keyring=kr)
    # The failure is openkms's DisabledException, carried through the MPL's list of KMS errors.
    assert "is disabled" in error_text(info.value)
    with pytest.raises(SDK_ERRORS):
        esdk.encrypt(source=data, keyring=kr, encryption_context=CONTEXT)

    kms.enable_key(KeyId=key_arn)
    plaintext, _ = esdk.decrypt(source=ciphertext, keyring=kr)
    assert plaintext == data


def test_tampered_encrypted_data_key_is_rejected_by_openkms(esdk: Any, keyring: Callable[..., Keyring],
                                                            new_key_arn: Callable[[], str],
                                                            kms_calls: Any) -> None:
    client, calls = kms_calls
    kr = keyring(new_key_arn(), client)
    ciphertext, header = esdk.encrypt(source=b"tamper me", keyring=kr, encryption_context=CONTEXT)
    [edk] = header.encrypted_data_keys
    blob = edk.encrypted_data_key
    at = ciphertext.index(blob)
    tampered = bytearray(ciphertext)
    tampered[at + len(blob) - 1] ^= 0x01  # last byte of openkms's ciphertext blob: its GCM tag

    with pytest.raises(SDK_ERRORS) as info:
        esdk.decrypt(source=bytes(tampered), keyring=kr)
    assert calls[-1][0] == "Decrypt"  # openkms saw the blob and refused it
    assert "the ciphertext is invalid" in error_text(info.value).lower()  # InvalidCiphertextException


def test_streaming_and_several_messages(esdk: Any, keyring: Callable[..., Keyring],
                                        new_key_arn: Callable[[], str]) -> None:
    kr = keyring(new_key_arn())
    data = os.urandom(64 * 1024 + 123)

    encrypted = io.BytesIO()
    with esdk.stream(mode="e", source=io.BytesIO(data), keyring=kr, encryption_context=CONTEXT,
                     frame_length=4096) as encryptor:
        for chunk in encryptor:
            encrypted.write(chunk)
        assert CONTEXT.items() <= encryptor.header.encryption_context.items()

    decrypted = io.BytesIO()
    with esdk.stream(mode="d", source=io.BytesIO(encrypted.getvalue()), keyring=kr) as decryptor:
        for chunk in decryptor:
            decrypted.write(chunk)
        assert CONTEXT.items() <= decryptor.header.encryption_context.items()
    assert decrypted.getvalue() == data

    # Each message gets its own data key from openkms; both decrypt, in any order.
    second, _ = esdk.encrypt(source=data, keyring=kr, encryption_context={"tenant": "t1", "n": "2"})
    assert second != encrypted.getvalue()
    plaintext, header = esdk.decrypt(source=second, keyring=kr)
    assert plaintext == data and header.encryption_context["n"] == "2"
    plaintext, _ = esdk.decrypt(source=encrypted.getvalue(), keyring=kr)
    assert plaintext == data


def test_multi_keyring_and_discovery_keyring(esdk: Any, mpl: Any, kms: Any, keyring: Callable[..., Keyring],
                                             new_key_arn: Callable[[], str], kms_calls: Any) -> None:
    client, calls = kms_calls
    first, second = new_key_arn(), new_key_arn()
    multi = mpl.create_multi_keyring(input=CreateMultiKeyringInput(
        generator=keyring(first, client), child_keyrings=[keyring(second, client)]))
    data = os.urandom(5000)
    ciphertext, header = esdk.encrypt(source=data, keyring=multi, encryption_context=CONTEXT)
    # GenerateDataKey under the generator, then KMS Encrypt of the same data key under the child.
    assert [op for op, _ in calls] == ["GenerateDataKey", "Encrypt"]
    assert sorted(edk.key_provider.key_info for edk in header.encrypted_data_keys) == sorted(
        [first.encode(), second.encode()])

    for key_arn in (first, second):
        plaintext, _ = esdk.decrypt(source=ciphertext, keyring=keyring(key_arn))
        assert plaintext == data

    # A discovery keyring takes the key ARN from the message itself.
    ours = mpl.create_aws_kms_discovery_keyring(input=CreateAwsKmsDiscoveryKeyringInput(
        kms_client=kms, discovery_filter=DiscoveryFilter(account_ids=[ACCOUNT_ID], partition="aws")))
    plaintext, _ = esdk.decrypt(source=ciphertext, keyring=ours)
    assert plaintext == data
    others = mpl.create_aws_kms_discovery_keyring(input=CreateAwsKmsDiscoveryKeyringInput(
        kms_client=kms, discovery_filter=DiscoveryFilter(account_ids=["999999999999"], partition="aws")))
    with pytest.raises(SDK_ERRORS):
        esdk.decrypt(source=ciphertext, keyring=others)


def test_responses_carry_the_key_arn_the_sdk_relies_on(kms: Any, new_key_arn: Callable[[], str]) -> None:
    key_arn = new_key_arn()
    key_id = key_arn.rsplit("/", 1)[1]
    alias = f"alias/esdk-{key_id[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=key_id)
    for ref in (key_id, key_arn, alias):
        gdk = kms.generate_data_key(KeyId=ref, NumberOfBytes=32, EncryptionContext=CONTEXT)
        assert gdk["KeyId"] == key_arn
        enc = kms.encrypt(KeyId=ref, Plaintext=gdk["Plaintext"], EncryptionContext=CONTEXT)
        assert enc["KeyId"] == key_arn
        for blob in (gdk["CiphertextBlob"], enc["CiphertextBlob"]):
            dec = kms.decrypt(CiphertextBlob=blob, KeyId=ref, EncryptionContext=CONTEXT)
            assert dec["KeyId"] == key_arn
            assert dec["Plaintext"] == gdk["Plaintext"]
