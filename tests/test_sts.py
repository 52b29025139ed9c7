"""STS GetCallerIdentity on the openkms endpoint, through boto3 and the AWS CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import ACCOUNT_ID


def test_get_caller_identity_boto3(server: Any) -> None:
    out = server.client(service="sts").get_caller_identity()
    assert out["Account"] == ACCOUNT_ID
    assert out["Arn"] == f"arn:aws:iam::{ACCOUNT_ID}:user/admin"
    assert out["UserId"]


def test_get_caller_identity_aws_cli(server: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", AWS_ACCESS_KEY_ID=server.access_key_id,
               AWS_SECRET_ACCESS_KEY=server.secret_access_key, AWS_DEFAULT_REGION="us-east-1",
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    result = subprocess.run(["aws", "sts", "get-caller-identity", "--endpoint-url", server.endpoint], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Account"] == ACCOUNT_ID


@pytest.mark.parametrize("secret,code", [("y" * 30, "SignatureDoesNotMatch")])
def test_sts_errors(server: Any, secret: str, code: str) -> None:
    with pytest.raises(ClientError) as e:
        server.client(service="sts", secret=secret).get_caller_identity()
    assert e.value.response["Error"]["Code"] == code
    with pytest.raises(ClientError) as e:
        server.client(service="sts", access_key_id="AKIAUNKNOWNUNKNOWN00").get_caller_identity()
    assert e.value.response["Error"]["Code"] == "InvalidClientTokenId"


def test_kms_signature_is_not_an_sts_signature(server: Any) -> None:
    """A request signed for kms cannot call STS, and the reverse (the scope names the service)."""
    import urllib.error
    import urllib.request

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    body = b"Action=GetCallerIdentity&Version=2011-06-15"
    request = AWSRequest(method="POST", url=server.endpoint + "/", data=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    SigV4Auth(Credentials(server.access_key_id, server.secret_access_key), "kms", "us-east-1").add_auth(request)
    prepared = request.prepare()
    http = urllib.request.Request(prepared.url, data=body, method="POST", headers=dict(prepared.headers.items()))
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(http, timeout=10)
    assert b"SignatureDoesNotMatch" in e.value.read()
