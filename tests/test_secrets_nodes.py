"""Secrets on two nodes sharing one PostgreSQL store: what one node writes, the other reads, within
OPENKMS_CACHE_TTL (each node keeps what GetSecretValue read: secrets/cache.py), and at once on the
node that wrote it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hsm_helpers import error_code, two_nodes_on, wait_until
from tests.server import ServerProcess

TTL = 1.0


@pytest.fixture
def two_nodes(pg_url: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with two_nodes_on(pg_url, tmp_path, {"OPENKMS_CACHE_TTL": str(TTL)}) as nodes:
        yield nodes


def test_a_write_on_one_node_is_read_on_the_other(two_nodes: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = two_nodes
    sm_a = a.client(service="secretsmanager", retry=False)
    sm_b = b.client(a.access_key_id, a.secret_access_key, service="secretsmanager", retry=False)
    arn = sm_a.create_secret(Name="shared/db", SecretString="one")["ARN"]
    assert sm_b.get_secret_value(SecretId="shared/db")["SecretString"] == "one"  # now in B's cache

    sm_a.put_secret_value(SecretId=arn, SecretString="two")
    assert sm_a.get_secret_value(SecretId=arn)["SecretString"] == "two"  # the writing node: at once
    wait_until(lambda: sm_b.get_secret_value(SecretId="shared/db")["SecretString"] == "two", 5 * TTL + 5)

    # B writes; A (which cached "two") follows, and B reads its own write at once.
    sm_b.put_secret_value(SecretId=arn, SecretString="three")
    assert sm_b.get_secret_value(SecretId=arn)["SecretString"] == "three"
    wait_until(lambda: sm_a.get_secret_value(SecretId=arn)["SecretString"] == "three", 5 * TTL + 5)
    assert sm_a.get_secret_value(SecretId=arn, VersionStage="AWSPREVIOUS")["SecretString"] == "two"

    # Deleted on A: B stops serving it within the TTL.
    sm_a.delete_secret(SecretId=arn, ForceDeleteWithoutRecovery=True)
    assert error_code(sm_a.get_secret_value, SecretId=arn) == "ResourceNotFoundException"
    wait_until(lambda: error_code(sm_b.get_secret_value, SecretId=arn) == "ResourceNotFoundException", 5 * TTL + 5)
