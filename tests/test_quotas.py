"""Request quotas (quotas.py) on a real server with quotas on, as shipped: AWS's defaults, per
account, ThrottlingException that boto3 and the AWS CLI understand, an operator's overrides, the
throttled calls in the metrics and the audit log, and one tenant unable to starve another."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from prometheus_client.parser import text_string_to_metric_families

from openkms.client.admin import AdminClient, AdminError
from openkms.quotas import QUOTAS
from tests.conftest import bootstrap_env
from tests.hsm_helpers import KMS_ALL_POLICY
from tests.server import REGION, ServerProcess

METRICS_TOKEN = "metrics-token-for-the-quota-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("quotas") / "data",
                        env=dict(bootstrap_env(), OPENKMS_QUOTAS="on", OPENKMS_METRICS_TOKEN=METRICS_TOKEN))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def operator(server: ServerProcess) -> AdminClient:
    return AdminClient(server.endpoint, server.access_key_id, server.secret_access_key, REGION)


def tenant(server: ServerProcess, operator: AdminClient, *, admin: bool = False) -> tuple[str, Any, dict[str, str]]:
    """A new account with a user allowed kms:* and secretsmanager:*: (account id, KMS client
    without retries, its credentials)."""
    account_id = str(secrets.randbelow(9 * 10**11) + 10**11)
    operator.call("CreateAccount", Name=f"q-{account_id}", AccountId=account_id)
    operator.call("CreateUser", AccountId=account_id, UserName="app", Admin=admin or None)
    policy = json.loads(KMS_ALL_POLICY)
    policy["Statement"].append({"Effect": "Allow", "Action": "secretsmanager:*", "Resource": "*"})
    operator.call("PutUserPolicy", AccountId=account_id, UserName="app", PolicyName="all",
                  PolicyDocument=json.dumps(policy))
    key = operator.call("CreateAccessKey", AccountId=account_id, UserName="app")["AccessKey"]
    creds = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
    return account_id, client(server, creds), creds


def client(server: ServerProcess, creds: dict[str, str], service: str = "kms", attempts: int = 1) -> Any:
    return boto3.client(service, endpoint_url=server.endpoint, region_name=REGION,
                        config=Config(retries={"total_max_attempts": attempts, "mode": "standard"}), **creds)


def burst(call: Callable[[], Any], n: int) -> list[str]:
    """`n` calls at once (no waiting between them): each one's outcome, "ok" or its error code."""
    out = []
    for _ in range(n):
        try:
            call()
            out.append("ok")
        except ClientError as exc:
            out.append(str(exc.response["Error"]["Code"]))
    return out


def at_once(call: Callable[[], Any], n: int) -> list[str]:
    """`n` calls sent together from `n` threads: each one's outcome, "ok" or its error code. (In a
    row, calls on a busy machine can take long enough for the bucket to refill between them.)"""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    start = threading.Barrier(n)

    def one() -> str:
        start.wait()
        return burst(call, 1)[0]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: one(), range(n)))


def test_create_key_is_throttled_at_aws_default_of_five_a_second(server: ServerProcess,
                                                                 operator: AdminClient) -> None:
    _, kms, _ = tenant(server, operator)
    outcomes = at_once(lambda: kms.create_key(), 12)
    assert set(outcomes) == {"ok", "ThrottlingException"}, outcomes
    assert 5 <= outcomes.count("ok") <= 7, outcomes  # a bucket of five, refilling at five a second
    try:
        kms.create_key()
    except ClientError as exc:
        assert exc.response["Error"]["Message"] == ("You have exceeded the rate at which you may call KMS. "
                                                    "Reduce the frequency of your calls.")
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    # The quota is a rate: a second later there is room again.
    time.sleep(1.2)
    assert burst(lambda: kms.create_key(), 3) == ["ok"] * 3


def test_boto3_retries_a_throttled_call_by_itself(server: ServerProcess, operator: AdminClient) -> None:
    account_id, kms, creds = tenant(server, operator)
    operator.call("PutRequestQuota", AccountId=account_id, QuotaName="kms:CreateKey", Value=0.5)  # one per 2 s
    patient = client(server, creds, attempts=10)
    assert burst(lambda: patient.create_key(), 4) == ["ok"] * 4  # the SDK backed off and retried
    assert burst(lambda: kms.create_key(), 1) == ["ThrottlingException"]  # what it met on the way


def test_one_account_cannot_starve_another(server: ServerProcess, operator: AdminClient) -> None:
    noisy_id, noisy, _ = tenant(server, operator)
    _, quiet, _ = tenant(server, operator)
    operator.call("PutRequestQuota", AccountId=noisy_id, QuotaName="kms:symmetric", Value=1)
    key = noisy.create_key()["KeyMetadata"]["KeyId"]
    quiet_key = quiet.create_key()["KeyMetadata"]["KeyId"]
    assert "ThrottlingException" in burst(lambda: noisy.encrypt(KeyId=key, Plaintext=b"x"), 10)
    assert burst(lambda: quiet.encrypt(KeyId=quiet_key, Plaintext=b"x"), 10) == ["ok"] * 10


def test_the_shared_cryptographic_quota_by_key_type(server: ServerProcess, operator: AdminClient) -> None:
    account_id, kms, _ = tenant(server, operator)
    operator.call("PutRequestQuota", AccountId=account_id, QuotaName="kms:symmetric", Value=4)
    symmetric = kms.create_key()["KeyMetadata"]["KeyId"]
    rsa = kms.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=symmetric, Plaintext=b"x")["CiphertextBlob"]
    time.sleep(1.1)
    # Encrypt, Decrypt (found by the blob's key), GenerateDataKey and GenerateRandom share one bucket ...
    calls = [lambda: kms.encrypt(KeyId=symmetric, Plaintext=b"x"), lambda: kms.decrypt(CiphertextBlob=blob),
             lambda: kms.generate_data_key(KeyId=symmetric, KeySpec="AES_256"),
             lambda: kms.generate_random(NumberOfBytes=8)]
    outcomes = [burst(call, 1)[0] for call in calls * 2]
    assert outcomes[:4] == ["ok"] * 4 and "ThrottlingException" in outcomes[4:], outcomes
    # ... and an RSA key's calls are counted apart (kms:rsa, 500 a second).
    assert burst(lambda: kms.encrypt(KeyId=rsa, Plaintext=b"x", EncryptionAlgorithm="RSAES_OAEP_SHA_256"), 5) == \
        ["ok"] * 5
    # Other operations have their own quotas.
    assert burst(lambda: kms.describe_key(KeyId=symmetric), 5) == ["ok"] * 5


def test_an_operator_sets_and_removes_an_accounts_quota(server: ServerProcess, operator: AdminClient) -> None:
    account_id, kms, creds = tenant(server, operator, admin=True)
    own = AdminClient(server.endpoint, creds["aws_access_key_id"], creds["aws_secret_access_key"], REGION)
    listed = {q["QuotaName"]: q for q in own.call("ListRequestQuotas", AccountId=account_id)["Quotas"]}
    assert set(listed) == set(QUOTAS)
    assert listed["kms:CreateKey"] == {
        "QuotaName": "kms:CreateKey", "Title": "CreateKey request rate", "Value": 5.0, "DefaultValue": 5.0,
        "Source": "default", "Operations": ["CreateKey"], "AwsFigure": True}
    assert listed["kms:symmetric"]["Value"] == 10_000.0
    assert listed["secretsmanager:GetSecretValue"]["Value"] == 10_000.0

    put = operator.call("PutRequestQuota", AccountId=account_id, QuotaName="kms:CreateKey", Value=50)["Quota"]
    assert (put["Value"], put["Source"]) == (50.0, "account")
    assert burst(lambda: kms.create_key(), 20) == ["ok"] * 20
    operator.call("DeleteRequestQuota", AccountId=account_id, QuotaName="kms:CreateKey")
    assert "ThrottlingException" in at_once(lambda: kms.create_key(), 12)

    # An account administrator reads its own quotas, and may not set them.
    with pytest.raises(AdminError) as denied:
        own.call("PutRequestQuota", AccountId=account_id, QuotaName="kms:CreateKey", Value=1000)
    assert denied.value.code == "AccessDeniedException"
    with pytest.raises(AdminError) as other:
        own.call("ListRequestQuotas", AccountId="111122223333")
    assert other.value.code == "AccessDeniedException"


def test_a_quota_for_every_account(server: ServerProcess, operator: AdminClient) -> None:
    account_id, _, _ = tenant(server, operator)
    operator.call("PutRequestQuota", AccountId="*", QuotaName="kms:ListAliases", Value=2)
    try:
        _, kms, _ = tenant(server, operator)
        assert "ThrottlingException" in at_once(lambda: kms.list_aliases(), 6)
        listed = {q["QuotaName"]: q for q in operator.call("ListRequestQuotas", AccountId=account_id)["Quotas"]}
        assert (listed["kms:ListAliases"]["Value"], listed["kms:ListAliases"]["Source"]) == (2.0, "every-account")
        # An account's own setting wins over the one for every account.
        operator.call("PutRequestQuota", AccountId=account_id, QuotaName="kms:ListAliases", Value=100)
        listed = {q["QuotaName"]: q for q in operator.call("ListRequestQuotas", AccountId=account_id)["Quotas"]}
        assert (listed["kms:ListAliases"]["Value"], listed["kms:ListAliases"]["Source"]) == (100.0, "account")
    finally:
        operator.call("DeleteRequestQuota", AccountId="*", QuotaName="kms:ListAliases")


@pytest.mark.parametrize(("params", "code"), [
    ({"AccountId": "*", "QuotaName": "kms:NoSuchThing", "Value": 5}, "ValidationException"),
    ({"AccountId": "*", "QuotaName": "kms:CreateKey", "Value": 0}, "ValidationException"),
    ({"AccountId": "*", "QuotaName": "kms:CreateKey", "Value": -1}, "ValidationException"),
    ({"AccountId": "*", "QuotaName": "kms:CreateKey", "Value": 1e12}, "ValidationException"),
    ({"AccountId": "*", "QuotaName": "kms:CreateKey", "Value": "fast"}, "SerializationException"),
    ({"AccountId": "999999999999", "QuotaName": "kms:CreateKey", "Value": 5}, "NotFoundException"),
    ({"AccountId": "*", "QuotaName": "kms:CreateKey"}, "ValidationException"),
])
def test_bad_quota_settings_are_refused(operator: AdminClient, params: dict[str, Any], code: str) -> None:
    with pytest.raises(AdminError) as refused:
        operator.call("PutRequestQuota", **params)
    assert refused.value.code == code


def test_secrets_manager_quotas(server: ServerProcess, operator: AdminClient) -> None:
    account_id, _, creds = tenant(server, operator)
    sm = client(server, creds, "secretsmanager")
    arn = sm.create_secret(Name="quota/db", SecretString="s")["ARN"]
    operator.call("PutRequestQuota", AccountId=account_id, QuotaName="secretsmanager:GetSecretValue", Value=2)
    outcomes = burst(lambda: sm.get_secret_value(SecretId=arn), 8)
    assert "ThrottlingException" in outcomes and outcomes[:2] == ["ok"] * 2, outcomes
    try:
        sm.get_secret_value(SecretId=arn)
    except ClientError as exc:
        assert (exc.response["Error"]["Code"], exc.response["Error"]["Message"]) == ("ThrottlingException",
                                                                                     "Rate exceeded")
    assert burst(lambda: sm.describe_secret(SecretId=arn), 5) == ["ok"] * 5  # a quota of its own


def test_throttled_calls_are_counted_and_audited(server: ServerProcess, operator: AdminClient) -> None:
    account_id, kms, _ = tenant(server, operator)
    before = throttled_count(server)
    outcomes = at_once(lambda: kms.create_key(), 12)
    throttled = outcomes.count("ThrottlingException")
    assert throttled >= 4
    assert throttled_count(server) - before >= throttled
    deadline = time.monotonic() + 10
    while True:
        events = operator.call("QueryAuditEvents", AccountId=account_id, EventName="CreateKey",
                               ErrorCode="ThrottlingException", Limit=100)["Events"]
        if len(events) >= throttled or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(events) == throttled


def throttled_count(server: ServerProcess) -> float:
    import urllib.request

    request = urllib.request.Request(server.endpoint + "/metrics",
                                     headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        text = answer.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) if family.name ==
               "openkms_throttled_requests" for s in family.samples
               if s.name.endswith("_total") and s.labels.get("api") == "kms")


def test_the_aws_cli_sees_throttling_exception(server: ServerProcess, operator: AdminClient,
                                               tmp_path: Path) -> None:
    account_id, _, creds = tenant(server, operator)
    operator.call("PutRequestQuota", AccountId=account_id, QuotaName="kms:CreateKey", Value=0.01)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
               AWS_ACCESS_KEY_ID=creds["aws_access_key_id"], AWS_SECRET_ACCESS_KEY=creds["aws_secret_access_key"],
               AWS_DEFAULT_REGION=REGION, AWS_ENDPOINT_URL_KMS=server.endpoint, AWS_MAX_ATTEMPTS="1",
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    kms = client(server, creds)
    assert burst(lambda: kms.create_key(), 2) == ["ok", "ThrottlingException"]  # one call per 100 s
    proc = subprocess.run(["aws", "kms", "create-key"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "ThrottlingException" in proc.stderr and "Reduce the frequency of your calls" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_quotas_off_admits_everything(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data", env=dict(bootstrap_env(), OPENKMS_QUOTAS="off"))
    srv.start()
    try:
        kms = srv.client(retry=False)
        assert burst(lambda: kms.create_key(), 15) == ["ok"] * 15
        op = AdminClient(srv.endpoint, srv.access_key_id, srv.secret_access_key, REGION)
        assert op.call("ListRequestQuotas", AccountId="*")["Enforced"] is False
    finally:
        srv.stop()
