"""Fixtures as a team writes them against LocalStack, pointed at `openkms serve --dev` instead.

Start the server, export the lines it prints, run pytest:

    openkms serve --dev &
    export AWS_ENDPOINT_URL=http://127.0.0.1:8080 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test ...
    pytest tests/dev_suite

(tests/test_dev.py runs this suite so; the project's own run does not collect it.)
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

ENDPOINT = os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:8080")
REGION = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")


def _client(service: str) -> Any:
    return boto3.client(service, endpoint_url=ENDPOINT, region_name=REGION,
                        aws_access_key_id="test", aws_secret_access_key="test")


@pytest.fixture(autouse=True)
def reset_kms() -> Iterator[None]:
    """Every test starts from an empty store."""
    request = urllib.request.Request(f"{ENDPOINT}/_openkms/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    yield


@pytest.fixture
def kms() -> Any:
    return _client("kms")


@pytest.fixture
def secretsmanager() -> Any:
    return _client("secretsmanager")


@pytest.fixture
def sts() -> Any:
    return _client("sts")


@pytest.fixture
def app_key(kms: Any) -> str:
    """The application's key, under the alias its configuration names."""
    key_id: str = kms.create_key(Description="app data key")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/app", TargetKeyId=key_id)
    return key_id
