"""The real AWS CLI (v1, the `aws` command) against a running openkms server.

Each `aws` process costs about a second to start, so set-up that is not itself under test goes
through boto3, and every CLI call below checks something a CLI user would do.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.server import ServerProcess


def find_aws_cli() -> str | None:
    """The `aws` script of this interpreter's environment (a venv need not be on PATH), else PATH's."""
    here = Path(sys.executable).parent / "aws"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("aws")


AWS_CLI = find_aws_cli()
pytestmark = pytest.mark.skipif(AWS_CLI is None, reason="the AWS CLI (`aws`, awscli v1) is not installed")

REGION = "us-east-1"
ACCOUNT_ID = "111122223333"


class AwsCli:
    """Runs `aws --endpoint-url <server> kms ...` with a clean, isolated environment."""

    def __init__(self, server: ServerProcess, workdir: Path) -> None:
        self.server = server
        self.workdir = workdir
        empty = workdir / "empty"
        empty.write_text("")
        # Nothing from the developer's own AWS set-up may leak in: no profiles, no tokens.
        base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        base.update({
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": str(empty),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty),
            "AWS_MAX_ATTEMPTS": "1",
            "AWS_RETRY_MODE": "standard",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_PAGER": "",
        })
        self.base_env = base
        self.env = dict(base, AWS_ACCESS_KEY_ID=server.access_key_id,
                        AWS_SECRET_ACCESS_KEY=server.secret_access_key)

    def argv(self, args: Sequence[str]) -> list[str]:
        return [AWS_CLI or "aws", "--endpoint-url", self.server.endpoint, "kms", *args]

    def run(self, *args: str, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(args), env=env or self.env, cwd=self.workdir, capture_output=True,
                              text=True, timeout=60, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"aws {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    def json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self.run(*args, "--output", "json", **kw).stdout)

    def text(self, *args: str, **kw: Any) -> str:
        return self.run(*args, "--output", "text", **kw).stdout.strip()

    def shell(self, pipeline_tail: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`aws ... | <pipeline_tail>` in bash with pipefail, as a user would type it."""
        command = f"set -o pipefail; {shlex.join(self.argv(args))} | {pipeline_tail}"
        return subprocess.run(["bash", "-c", command], env=self.env, cwd=self.workdir, capture_output=True,
                              text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def aws(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> AwsCli:
    return AwsCli(server, tmp_path_factory.mktemp("awscli"))


@pytest.fixture(scope="module")
def kms(server: ServerProcess) -> Any:
    return server.client()


@pytest.fixture
def new_key(kms: Any) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        return kms.create_key(Description="awscli test")["KeyMetadata"]  # type: ignore[no-any-return]
    return make


def arn_of(key_id: str) -> str:
    return f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:key/{key_id}"


def test_create_describe_list_and_alias(aws: AwsCli, kms: Any) -> None:
    md = aws.json("create-key", "--description", "made by the aws cli",
                  "--tags", "TagKey=env,TagValue=test", "TagKey=team,TagValue=crypto")["KeyMetadata"]
    key_id, arn = md["KeyId"], md["Arn"]
    assert arn == arn_of(key_id)
    assert md["Description"] == "made by the aws cli"
    assert md["KeyState"] == "Enabled" and md["Enabled"] is True
    assert md["KeyUsage"] == "ENCRYPT_DECRYPT" and md["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert md["AWSAccountId"] == ACCOUNT_ID
    tags = kms.list_resource_tags(KeyId=key_id)["Tags"]
    assert sorted((t["TagKey"], t["TagValue"]) for t in tags) == [("env", "test"), ("team", "crypto")]

    alias = f"alias/cli-{uuid.uuid4().hex[:8]}"
    assert aws.run("create-alias", "--alias-name", alias, "--target-key-id", key_id).stdout.strip() == ""

    alias_arn = f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:{alias}"
    for ref in (key_id, arn, alias, alias_arn):
        assert aws.text("describe-key", "--key-id", ref, "--query", "KeyMetadata.Arn") == arn, ref

    # --output text of a list: one KEYS line per key, tab-separated KeyArn and KeyId.
    lines = aws.text("list-keys").splitlines()
    assert f"KEYS\t{arn}\t{key_id}" in lines

    listed = aws.json("list-aliases", "--key-id", key_id)["Aliases"]
    assert [(a["AliasName"], a["AliasArn"], a["TargetKeyId"]) for a in listed] == [(alias, alias_arn, key_id)]


def test_encrypt_decrypt_binary_round_trip(aws: AwsCli, new_key: Callable[[], dict[str, Any]]) -> None:
    key_id = new_key()["KeyId"]
    # Every byte value, including NUL and newline, must survive fileb:// and base64; 4096 is
    # the largest plaintext Encrypt takes.
    plaintext = bytes(range(256)) + os.urandom(4096 - 256)
    (aws.workdir / "plain.bin").write_bytes(plaintext)

    enc = aws.json("encrypt", "--key-id", key_id, "--plaintext", "fileb://plain.bin",
                   "--encryption-context", "tenant=t1,purpose=cli")
    assert enc["KeyId"] == arn_of(key_id)
    assert enc["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    ciphertext = base64.b64decode(enc["CiphertextBlob"])
    assert plaintext not in ciphertext
    (aws.workdir / "cipher.bin").write_bytes(ciphertext)

    # The documented CLI idiom: --query Plaintext --output text | base64 -d
    proc = aws.shell("base64 -d > decrypted.bin", "decrypt", "--ciphertext-blob", "fileb://cipher.bin",
                     "--encryption-context", "tenant=t1,purpose=cli", "--query", "Plaintext", "--output", "text")
    assert proc.returncode == 0, proc.stderr
    assert (aws.workdir / "decrypted.bin").read_bytes() == plaintext

    dec = aws.json("decrypt", "--ciphertext-blob", "fileb://cipher.bin", "--key-id", key_id,
                   "--encryption-context", "purpose=cli,tenant=t1")
    assert dec["KeyId"] == arn_of(key_id)
    assert base64.b64decode(dec["Plaintext"]) == plaintext

    wrong = aws.run("decrypt", "--ciphertext-blob", "fileb://cipher.bin",
                    "--encryption-context", "tenant=t2,purpose=cli", check=False)
    assert wrong.returncode != 0
    assert "InvalidCiphertextException" in wrong.stderr


def test_generate_data_key_and_random(aws: AwsCli, kms: Any, new_key: Callable[[], dict[str, Any]]) -> None:
    key_id = new_key()["KeyId"]
    out = aws.json("generate-data-key", "--key-id", key_id, "--key-spec", "AES_256",
                   "--encryption-context", "k=v")
    assert out["KeyId"] == arn_of(key_id)
    data_key = base64.b64decode(out["Plaintext"])
    assert len(data_key) == 32
    back = kms.decrypt(CiphertextBlob=base64.b64decode(out["CiphertextBlob"]), EncryptionContext={"k": "v"})
    assert back["Plaintext"] == data_key

    text = aws.text("generate-random", "--number-of-bytes", "48", "--query", "Plaintext")
    assert len(base64.b64decode(text, validate=True)) == 48


def test_re_encrypt_to_another_key(aws: AwsCli, kms: Any, new_key: Callable[[], dict[str, Any]]) -> None:
    source, dest = new_key()["KeyId"], new_key()["KeyId"]
    plaintext = os.urandom(300)
    blob = kms.encrypt(KeyId=source, Plaintext=plaintext, EncryptionContext={"a": "1"})["CiphertextBlob"]
    (aws.workdir / "re-src.bin").write_bytes(blob)

    out = aws.json("re-encrypt", "--ciphertext-blob", "fileb://re-src.bin",
                   "--source-encryption-context", "a=1", "--destination-key-id", dest,
                   "--destination-encryption-context", "b=2")
    assert out["SourceKeyId"] == arn_of(source)
    assert out["KeyId"] == arn_of(dest)
    new_blob = base64.b64decode(out["CiphertextBlob"])
    back = kms.decrypt(CiphertextBlob=new_blob, EncryptionContext={"b": "2"})
    assert back["KeyId"] == arn_of(dest) and back["Plaintext"] == plaintext


def test_disable_key_then_encrypt_fails(aws: AwsCli, kms: Any, new_key: Callable[[], dict[str, Any]]) -> None:
    key_id = new_key()["KeyId"]
    (aws.workdir / "small.bin").write_bytes(b"\x00secret\xff")
    aws.run("disable-key", "--key-id", key_id)
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"

    failed = aws.run("encrypt", "--key-id", key_id, "--plaintext", "fileb://small.bin", check=False)
    assert failed.returncode != 0
    assert "DisabledException" in failed.stderr
    assert failed.stdout == ""

    aws.run("enable-key", "--key-id", key_id)
    assert kms.encrypt(KeyId=key_id, Plaintext=b"\x00secret\xff")["KeyId"] == arn_of(key_id)


def test_schedule_and_cancel_key_deletion(aws: AwsCli, kms: Any, new_key: Callable[[], dict[str, Any]]) -> None:
    key_id = new_key()["KeyId"]
    out = aws.json("schedule-key-deletion", "--key-id", key_id, "--pending-window-in-days", "7")
    assert out["KeyId"] == arn_of(key_id)
    assert out["KeyState"] == "PendingDeletion"
    assert out["PendingWindowInDays"] == 7
    md = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert md["KeyState"] == "PendingDeletion" and "DeletionDate" in md

    assert aws.json("cancel-key-deletion", "--key-id", key_id) == {"KeyId": arn_of(key_id)}
    # As in AWS, a key whose deletion is cancelled comes back disabled.
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"


def test_tag_resource_and_list_tags(aws: AwsCli, new_key: Callable[[], dict[str, Any]]) -> None:
    key_id = new_key()["KeyId"]
    aws.run("tag-resource", "--key-id", key_id, "--tags", "TagKey=owner,TagValue=alice",
            "TagKey=cost-center,TagValue=42")
    lines = aws.text("list-resource-tags", "--key-id", key_id).splitlines()
    assert sorted(lines) == ["TAGS\tcost-center\t42", "TAGS\towner\talice"]
    assert aws.text("list-resource-tags", "--key-id", key_id,
                    "--query", "Tags[?TagKey=='owner'].TagValue | [0]") == "alice"


def test_bootstrap_credentials_file_works_as_is(aws: AwsCli, server: ServerProcess,
                                                new_key: Callable[[], dict[str, Any]]) -> None:
    creds = server.data_dir / "credentials"
    assert creds.exists()
    key_id = new_key()["KeyId"]
    # No AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY: the CLI must find the key pair in the file.
    env = dict(aws.base_env, AWS_SHARED_CREDENTIALS_FILE=str(creds))
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert aws.text("describe-key", "--key-id", key_id, "--query", "KeyMetadata.AWSAccountId",
                    env=env) == ACCOUNT_ID

    # The CLI reads `region` only from its config file, not from the credentials file; the file's
    # [default] section is valid config too, so pointing both variables at it needs nothing else.
    env_no_region = {k: v for k, v in env.items() if k not in ("AWS_DEFAULT_REGION", "AWS_REGION")}
    env_no_region["AWS_CONFIG_FILE"] = str(creds)
    assert aws.text("describe-key", "--key-id", key_id, "--query", "KeyMetadata.Arn",
                    env=env_no_region) == arn_of(key_id)

    # The same file with a wrong secret is refused: the file, not some other credential, was used.
    bad = aws.workdir / "bad-credentials"
    bad.write_text(creds.read_text().replace(server.secret_access_key, "x" * 40))
    failed = aws.run("list-keys", env=dict(env, AWS_SHARED_CREDENTIALS_FILE=str(bad)), check=False)
    assert failed.returncode != 0
    assert "InvalidSignatureException" in failed.stderr


# -- asymmetric, HMAC and access-control operations through the CLI ------------------------------------

def test_asymmetric_and_hmac_operations_with_the_cli(aws: AwsCli) -> None:
    work = aws.workdir
    (work / "message.bin").write_bytes(b"release 1.0")
    # Sign with an ECC key, verify with the CLI and outside openkms with openssl.
    ecc = aws.json("create-key", "--key-spec", "ECC_NIST_P256", "--key-usage", "SIGN_VERIFY")["KeyMetadata"]
    assert ecc["SigningAlgorithms"] == ["ECDSA_SHA_256"]
    assert aws.shell("base64 -d > signature.bin", "sign", "--key-id", ecc["KeyId"], "--message",
                     "fileb://message.bin", "--message-type", "RAW", "--signing-algorithm", "ECDSA_SHA_256",
                     "--query", "Signature", "--output", "text").returncode == 0
    verified = aws.json("verify", "--key-id", ecc["KeyId"], "--message", "fileb://message.bin", "--message-type",
                        "RAW", "--signing-algorithm", "ECDSA_SHA_256", "--signature", "fileb://signature.bin")
    assert verified["SignatureValid"] is True
    assert aws.shell("base64 -d > public.der", "get-public-key", "--key-id", ecc["KeyId"], "--query", "PublicKey",
                     "--output", "text").returncode == 0
    outside = subprocess.run(["openssl", "dgst", "-sha256", "-verify", "public.der", "-keyform", "DER",
                              "-signature", "signature.bin", "message.bin"], cwd=work, capture_output=True,
                             text=True, timeout=30, check=False)
    assert outside.returncode == 0 and "Verified OK" in outside.stdout, outside.stderr
    (work / "other.bin").write_bytes(b"release 1.1")
    bad = aws.run("verify", "--key-id", ecc["KeyId"], "--message", "fileb://other.bin", "--message-type", "RAW",
                  "--signing-algorithm", "ECDSA_SHA_256", "--signature", "fileb://signature.bin", check=False)
    assert bad.returncode != 0 and "KMSInvalidSignatureException" in bad.stderr

    # MACs.
    hmac_key = aws.json("create-key", "--key-spec", "HMAC_256", "--key-usage", "GENERATE_VERIFY_MAC")["KeyMetadata"]
    assert aws.shell("base64 -d > mac.bin", "generate-mac", "--key-id", hmac_key["KeyId"], "--message",
                     "fileb://message.bin", "--mac-algorithm", "HMAC_SHA_256", "--query", "Mac",
                     "--output", "text").returncode == 0
    assert aws.json("verify-mac", "--key-id", hmac_key["KeyId"], "--message", "fileb://message.bin",
                    "--mac-algorithm", "HMAC_SHA_256", "--mac", "fileb://mac.bin")["MacValid"] is True
    bad = aws.run("verify-mac", "--key-id", hmac_key["KeyId"], "--message", "fileb://other.bin", "--mac-algorithm",
                  "HMAC_SHA_256", "--mac", "fileb://mac.bin", check=False)
    assert bad.returncode != 0 and "KMSInvalidMacException" in bad.stderr

    # RSA encryption: encrypt with the CLI, decrypt with the CLI.
    rsa = aws.json("create-key", "--key-spec", "RSA_2048", "--key-usage", "ENCRYPT_DECRYPT")["KeyMetadata"]
    assert aws.shell("base64 -d > rsa.enc", "encrypt", "--key-id", rsa["KeyId"], "--plaintext", "fileb://message.bin",
                     "--encryption-algorithm", "RSAES_OAEP_SHA_256", "--query", "CiphertextBlob",
                     "--output", "text").returncode == 0
    back = aws.shell("base64 -d", "decrypt", "--key-id", rsa["KeyId"], "--ciphertext-blob", "fileb://rsa.enc",
                     "--encryption-algorithm", "RSAES_OAEP_SHA_256", "--query", "Plaintext", "--output", "text")
    assert back.returncode == 0 and back.stdout == "release 1.0"

    # Key agreement and data key pairs.
    agree = aws.json("create-key", "--key-spec", "ECC_NIST_P256", "--key-usage", "KEY_AGREEMENT")["KeyMetadata"]
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
                    "peer.pem"], cwd=work, check=True, capture_output=True, timeout=30)
    subprocess.run(["openssl", "pkey", "-in", "peer.pem", "-pubout", "-outform", "DER", "-out", "peer.der"],
                   cwd=work, check=True, capture_output=True, timeout=30)
    secret = aws.json("derive-shared-secret", "--key-id", agree["KeyId"], "--key-agreement-algorithm", "ECDH",
                      "--public-key", "fileb://peer.der")
    assert secret["KeyAgreementAlgorithm"] == "ECDH" and secret["SharedSecret"]
    symmetric = aws.json("create-key")["KeyMetadata"]
    pair = aws.json("generate-data-key-pair-without-plaintext", "--key-id", symmetric["KeyId"], "--key-pair-spec",
                    "ECC_NIST_P384")
    assert pair["KeyPairSpec"] == "ECC_NIST_P384" and pair["PrivateKeyCiphertextBlob"] and pair["PublicKey"]


def test_key_policy_and_grants_with_the_cli(aws: AwsCli) -> None:
    key = aws.json("create-key")["KeyMetadata"]
    policy = json.loads(aws.text("get-key-policy", "--key-id", key["KeyId"], "--policy-name", "default",
                                 "--query", "Policy"))
    assert policy["Statement"][0]["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT_ID}:root"}
    policy["Statement"].append({"Sid": "Deny secret", "Effect": "Deny", "Principal": "*", "Action": "kms:Encrypt",
                                "Resource": "*",
                                "Condition": {"StringEquals": {"kms:EncryptionContext:classification": "secret"}}})
    (aws.workdir / "policy.json").write_text(json.dumps(policy))
    aws.run("put-key-policy", "--key-id", key["KeyId"], "--policy-name", "default", "--policy", "file://policy.json")
    (aws.workdir / "p.bin").write_bytes(b"x")
    denied = aws.run("encrypt", "--key-id", key["KeyId"], "--plaintext", "fileb://p.bin", "--encryption-context",
                     "classification=secret", check=False)
    assert denied.returncode != 0 and "AccessDeniedException" in denied.stderr
    grant = aws.json("create-grant", "--key-id", key["KeyId"], "--grantee-principal",
                     f"arn:aws:iam::{ACCOUNT_ID}:user/someone", "--operations", "Decrypt", "Encrypt")
    listed = aws.json("list-grants", "--key-id", key["KeyId"])["Grants"]
    assert [g["GrantId"] for g in listed] == [grant["GrantId"]]
    aws.run("revoke-grant", "--key-id", key["KeyId"], "--grant-id", grant["GrantId"])
    assert aws.json("list-grants", "--key-id", key["KeyId"])["Grants"] == []
