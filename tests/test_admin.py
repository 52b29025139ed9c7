"""`openkms admin`: accounts, users and access keys, driven through the real command line.

The command runs as a subprocess against a running server and prints JSON on stdout; errors go
to stderr as `openkms admin: <Code>: <message>` with a non-zero exit. What the admin creates is
then used with boto3 as a KMS user would: its own keys, no sight of other accounts' keys.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import bootstrap_env
from tests.server import ServerProcess

ADMIN_ACCOUNT = "111122223333"
REGION = "us-east-1"


def random_account_id() -> str:
    return str(secrets.randbelow(9 * 10**11) + 10**11)


def write_credentials(path: Path, access_key_id: str, secret: str, profile: str = "default") -> Path:
    path.write_text(f"[{profile}]\naws_access_key_id = {access_key_id}\n"
                    f"aws_secret_access_key = {secret}\nregion = {REGION}\n")
    return path


def run_admin(server: ServerProcess, credentials: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: the command must take its credentials from the file, nowhere else.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPENKMS_"))}
    cmd = [sys.executable, "-m", "openkms.cli.main", "admin", "--endpoint-url", server.endpoint,
           "--credentials-file", str(credentials), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


@dataclass
class AdminCli:
    server: ServerProcess
    issued_secrets: list[str]

    def run(self, *args: str, credentials: Path | None = None) -> subprocess.CompletedProcess[str]:
        proc = run_admin(self.server, credentials or self.server.data_dir / "credentials", *args)
        if proc.returncode == 0 and args and args[0] == "create-access-key":
            self.issued_secrets.append(json.loads(proc.stdout)["AccessKey"]["SecretAccessKey"])
        return proc

    def __call__(self, *args: str) -> Any:
        proc = self.run(*args)
        assert proc.returncode == 0, f"openkms admin {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
        return json.loads(proc.stdout)

    def fails(self, code: str, *args: str, credentials: Path | None = None) -> str:
        proc = self.run(*args, credentials=credentials)
        assert proc.returncode != 0, f"openkms admin {' '.join(args)} succeeded:\n{proc.stdout}"
        assert code in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stdout == ""
        return proc.stderr


KMS_ALL_POLICY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]})


@dataclass
class Tenant:
    account_id: str
    user_name: str
    access_key_id: str
    secret: str
    kms: Any


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> AdminCli:
    return AdminCli(server, [server.secret_access_key])


@pytest.fixture(scope="module")
def tenant(server: ServerProcess, admin: AdminCli) -> Tenant:
    account_id = random_account_id()
    admin("create-account", "--name", "tenant", "--account-id", account_id)
    admin("create-user", "--account-id", account_id, "--user-name", "app")
    # Users have no permissions until an identity policy grants them, as in AWS IAM.
    admin("put-user-policy", "--account-id", account_id, "--user-name", "app", "--policy-name", "kms-all",
          "--policy-document", KMS_ALL_POLICY)
    key = admin("create-access-key", "--account-id", account_id, "--user-name", "app")["AccessKey"]
    return Tenant(account_id, "app", key["AccessKeyId"], key["SecretAccessKey"],
                  server.client(key["AccessKeyId"], key["SecretAccessKey"]))


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return exc.value.response["Error"]["Code"]  # type: ignore[no-any-return]


# -- accounts -------------------------------------------------------------------------------------

def test_create_account_without_id_and_list(admin: AdminCli) -> None:
    account = admin("create-account", "--name", "generated-id")["Account"]
    assert re.fullmatch(r"\d{12}", account["AccountId"]) and account["AccountId"] != ADMIN_ACCOUNT
    assert account["Name"] == "generated-id"
    assert isinstance(account["CreationDate"], (int, float))

    listed = {a["AccountId"]: a["Name"] for a in admin("list-accounts")["Accounts"]}
    assert listed[ADMIN_ACCOUNT] == "admin"
    assert listed[account["AccountId"]] == "generated-id"


def test_create_account_with_id_and_duplicate(admin: AdminCli) -> None:
    account_id = random_account_id()
    account = admin("create-account", "--name", "chosen-id", "--account-id", account_id)["Account"]
    assert account["AccountId"] == account_id

    admin.fails("AlreadyExistsException", "create-account", "--name", "again", "--account-id", account_id)
    admin.fails("AlreadyExistsException", "create-account", "--name", "admin", "--account-id", ADMIN_ACCOUNT)
    admin.fails("ValidationException", "create-account", "--name", "bad", "--account-id", "12345")
    names = [a["Name"] for a in admin("list-accounts")["Accounts"] if a["AccountId"] == account_id]
    assert names == ["chosen-id"]


# -- users and access keys --------------------------------------------------------------------------

def test_users_and_access_keys(admin: AdminCli, tenant: Tenant) -> None:
    user = admin("create-user", "--account-id", tenant.account_id, "--user-name", "ops")["User"]
    assert user == {"UserName": "ops", "AccountId": tenant.account_id, "Admin": False, "Operator": False,
                    "Level": "user", "Arn": f"arn:aws:iam::{tenant.account_id}:user/ops"}
    admin.fails("AlreadyExistsException", "create-user", "--account-id", tenant.account_id, "--user-name", "ops")
    admin.fails("NotFoundException", "create-user", "--account-id", "999999999999", "--user-name", "x")

    users = {u["UserName"]: u for u in admin("list-users", "--account-id", tenant.account_id)["Users"]}
    assert set(users) == {"app", "ops"}

    key = admin("create-access-key", "--account-id", tenant.account_id, "--user-name", "ops")["AccessKey"]
    assert re.fullmatch(r"AKIA[A-Z2-7]{16}", key["AccessKeyId"])
    assert len(key["SecretAccessKey"]) >= 40
    assert key["Status"] == "Active" and key["UserName"] == "ops" and key["AccountId"] == tenant.account_id

    proc = admin.run("list-access-keys", "--account-id", tenant.account_id, "--user-name", "ops")
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)["AccessKeys"]
    assert [(k["AccessKeyId"], k["Status"]) for k in listed] == [(key["AccessKeyId"], "Active")]
    # The secret is shown once, at creation, and never again.
    assert key["SecretAccessKey"] not in proc.stdout
    assert all("SecretAccessKey" not in k for k in listed)
    admin.fails("NotFoundException", "list-access-keys", "--account-id", tenant.account_id, "--user-name", "nobody")


# -- the new account in use ---------------------------------------------------------------------------

def test_new_user_works_in_its_own_account(tenant: Tenant) -> None:
    md = tenant.kms.create_key(Description="tenant key")["KeyMetadata"]
    assert md["AWSAccountId"] == tenant.account_id
    assert md["Arn"] == f"arn:aws:kms:{REGION}:{tenant.account_id}:key/{md['KeyId']}"
    blob = tenant.kms.encrypt(KeyId=md["Arn"], Plaintext=b"tenant data", EncryptionContext={"t": "1"})
    assert blob["KeyId"] == md["Arn"]
    out = tenant.kms.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext={"t": "1"})
    assert out["Plaintext"] == b"tenant data" and out["KeyId"] == md["Arn"]

    listed = [k["KeyArn"] for k in tenant.kms.list_keys()["Keys"]]
    assert md["Arn"] in listed
    assert all(f":{tenant.account_id}:" in arn for arn in listed)


def test_accounts_cannot_see_each_other(server: ServerProcess, tenant: Tenant) -> None:
    admin_kms = server.client()
    theirs = admin_kms.create_key(Description="admin's key")["KeyMetadata"]
    blob = admin_kms.encrypt(KeyId=theirs["KeyId"], Plaintext=b"admin only")["CiphertextBlob"]

    # Another account's key: by ARN the key policy decides (the default one names only its own
    # account: AccessDeniedException, as in AWS); a bare key id only ever means a key of one's own account.
    for ref, code in ((theirs["Arn"], "AccessDeniedException"), (theirs["KeyId"], "NotFoundException")):
        with pytest.raises(ClientError) as info:
            tenant.kms.describe_key(KeyId=ref)
        assert error_code(info) == code
        with pytest.raises(ClientError) as info:
            tenant.kms.encrypt(KeyId=ref, Plaintext=b"x")
        assert error_code(info) == code
    assert theirs["KeyId"] not in {k["KeyId"] for k in tenant.kms.list_keys(Limit=1000)["Keys"]}
    with pytest.raises(ClientError) as info:
        tenant.kms.decrypt(CiphertextBlob=blob)
    assert error_code(info) == "AccessDeniedException"

    # The other way round too, and alias names are per account.
    mine = tenant.kms.create_key()["KeyMetadata"]
    with pytest.raises(ClientError) as info:
        admin_kms.describe_key(KeyId=mine["Arn"])
    assert error_code(info) == "AccessDeniedException"
    alias = f"alias/shared-{secrets.token_hex(4)}"
    admin_kms.create_alias(AliasName=alias, TargetKeyId=theirs["KeyId"])
    tenant.kms.create_alias(AliasName=alias, TargetKeyId=mine["KeyId"])
    assert admin_kms.describe_key(KeyId=alias)["KeyMetadata"]["Arn"] == theirs["Arn"]
    assert tenant.kms.describe_key(KeyId=alias)["KeyMetadata"]["Arn"] == mine["Arn"]


def test_access_key_status_and_deletion(server: ServerProcess, admin: AdminCli, tenant: Tenant) -> None:
    key = admin("create-access-key", "--account-id", tenant.account_id, "--user-name", tenant.user_name)["AccessKey"]
    akid = key["AccessKeyId"]
    kms = server.client(akid, key["SecretAccessKey"])
    kms.list_keys()

    assert admin("update-access-key", "--access-key-id", akid, "--status", "Inactive") == {}
    with pytest.raises(ClientError) as info:
        kms.list_keys()
    assert error_code(info) == "UnrecognizedClientException"
    statuses = {k["AccessKeyId"]: k["Status"] for k in admin(
        "list-access-keys", "--account-id", tenant.account_id, "--user-name", tenant.user_name)["AccessKeys"]}
    assert statuses == {tenant.access_key_id: "Active", akid: "Inactive"}
    tenant.kms.list_keys()  # the user's other key is unaffected

    admin("update-access-key", "--access-key-id", akid, "--status", "Active")
    kms.list_keys()

    assert admin("delete-access-key", "--access-key-id", akid) == {}
    with pytest.raises(ClientError) as info:
        kms.list_keys()
    assert error_code(info) == "UnrecognizedClientException"
    listed = admin("list-access-keys", "--account-id", tenant.account_id, "--user-name", tenant.user_name)
    assert [k["AccessKeyId"] for k in listed["AccessKeys"]] == [tenant.access_key_id]

    admin.fails("NotFoundException", "delete-access-key", "--access-key-id", akid)
    admin.fails("NotFoundException", "update-access-key", "--access-key-id", akid, "--status", "Active")
    proc = admin.run("update-access-key", "--access-key-id", tenant.access_key_id, "--status", "Deleted")
    assert proc.returncode != 0 and "invalid choice" in proc.stderr  # argparse refuses it up front


# -- who may use the admin API -------------------------------------------------------------------------

def test_non_admin_user_is_denied(admin: AdminCli, tenant: Tenant, tmp_path: Path) -> None:
    creds = write_credentials(tmp_path / "tenant-credentials", tenant.access_key_id, tenant.secret)
    stderr = admin.fails("AccessDeniedException", "list-accounts", credentials=creds)
    assert f"arn:aws:iam::{tenant.account_id}:user/{tenant.user_name}" in stderr
    name = f"sneaky-{secrets.token_hex(3)}"
    admin.fails("AccessDeniedException", "create-account", "--name", name, credentials=creds)
    admin.fails("AccessDeniedException", "create-access-key", "--account-id", ADMIN_ACCOUNT,
                "--user-name", "admin", credentials=creds)
    assert name not in {a["Name"] for a in admin("list-accounts")["Accounts"]}

    # An admin user made in another account may use the admin API.
    user = f"root-{secrets.token_hex(3)}"
    assert admin("create-user", "--account-id", tenant.account_id, "--user-name", user, "--admin")["User"]["Admin"]
    key = admin("create-access-key", "--account-id", tenant.account_id, "--user-name", user)["AccessKey"]
    creds2 = write_credentials(tmp_path / "tenant-admin", key["AccessKeyId"], key["SecretAccessKey"])
    proc = admin.run("list-accounts", credentials=creds2)
    assert proc.returncode == 0, proc.stderr
    assert tenant.account_id in {a["AccountId"] for a in json.loads(proc.stdout)["Accounts"]}


def test_credentials_file_errors(server: ServerProcess, admin: AdminCli, tmp_path: Path) -> None:
    unknown = write_credentials(tmp_path / "unknown", "AKIA" + "A" * 16, "x" * 40)
    admin.fails("UnrecognizedClientException", "list-accounts", credentials=unknown)
    wrong = write_credentials(tmp_path / "wrong", server.access_key_id, "x" * 40)
    admin.fails("InvalidSignatureException", "list-accounts", credentials=wrong)

    # A named profile is read; a missing one is a clear message, not a traceback.
    named = write_credentials(tmp_path / "named", server.access_key_id, server.secret_access_key, profile="ops")
    proc = admin.run("--profile", "ops", "list-accounts", credentials=named)
    assert proc.returncode == 0, proc.stderr
    assert ADMIN_ACCOUNT in {a["AccountId"] for a in json.loads(proc.stdout)["Accounts"]}
    missing = admin.run("list-accounts", credentials=named)  # no [default] in that file
    assert missing.returncode != 0
    assert "Traceback" not in missing.stderr and "[default]" in missing.stderr


# -- secrets stay out of the logs ---------------------------------------------------------------------

def test_secrets_never_reach_the_server_log(server: ServerProcess, admin: AdminCli, tenant: Tenant) -> None:
    # Runs last in this module: by now every secret issued above has been created and used.
    key = admin("create-access-key", "--account-id", tenant.account_id, "--user-name", tenant.user_name)["AccessKey"]
    server.client(key["AccessKeyId"], key["SecretAccessKey"]).list_keys()
    admin("delete-access-key", "--access-key-id", key["AccessKeyId"])
    output = server.output()
    assert "openkms serving on" in output
    assert len(admin.issued_secrets) >= 3
    for secret in admin.issued_secrets:
        assert secret not in output


@pytest.fixture
def debug_server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "data", env=dict(bootstrap_env(), OPENKMS_LOG_LEVEL="debug",
                                                     OPENKMS_ACCESS_LOG="on"))
    proc.start()
    yield proc
    proc.stop()


def test_secrets_stay_out_of_a_debug_log(debug_server: ServerProcess) -> None:
    cli = AdminCli(debug_server, [debug_server.secret_access_key])
    account_id = random_account_id()
    cli("create-account", "--name", "dbg", "--account-id", account_id)
    cli("create-user", "--account-id", account_id, "--user-name", "u")
    cli("put-user-policy", "--account-id", account_id, "--user-name", "u", "--policy-name", "kms-all",
        "--policy-document", KMS_ALL_POLICY)
    key = cli("create-access-key", "--account-id", account_id, "--user-name", "u")["AccessKey"]
    kms = debug_server.client(key["AccessKeyId"], key["SecretAccessKey"])
    kms.create_key()
    cli("update-access-key", "--access-key-id", key["AccessKeyId"], "--status", "Inactive")
    with pytest.raises(ClientError):
        kms.list_keys()
    with pytest.raises(ClientError):
        debug_server.client(debug_server.access_key_id, key["SecretAccessKey"]).list_keys()
    output = debug_server.output()
    assert " admin CreateAccessKey 200 " in output  # the calls are really logged (the access log's line)
    for secret in cli.issued_secrets:
        assert secret not in output
