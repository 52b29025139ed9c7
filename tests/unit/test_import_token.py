"""Import tokens over their lifetime, in-process over a real SQLite store with a clock we move:
ExpiredImportTokenException once the 24 hours have passed, also after the scheduler has purged the
token's row; InvalidImportTokenException for anything the store did not issue for that key."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from openkms.client.byok import wrap_key_material
from openkms.config import Settings
from openkms.errors import ExpiredImportTokenException, InvalidImportTokenException
from openkms.model import Caller
from openkms.node import Node, open_node
from openkms.service import OPERATIONS, run_scheduled_work


@pytest.fixture
def node(tmp_path: Path) -> Any:
    node = open_node(Settings(data_dir=tmp_path / "data"))
    yield node
    node.close()


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def setup(node: Node) -> tuple[Caller, Clock]:
    clock = Clock()
    node.service.clock = clock
    node.accounts.bootstrap("111122223333", None, None)
    principal = node.accounts.user("111122223333", "admin")
    return Caller(principal, "AKIA-TEST"), clock


def call(node: Node, caller: Caller, operation: str, params: dict[str, Any]) -> dict[str, Any]:
    return OPERATIONS[operation].handler(node.service, caller, params)


def parameters(node: Node, caller: Caller, key_id: str) -> dict[str, Any]:
    return call(node, caller, "GetParametersForImport",
                {"KeyId": key_id, "WrappingAlgorithm": "RSAES_OAEP_SHA_256", "WrappingKeySpec": "RSA_2048"})


def import_with(node: Node, caller: Caller, key_id: str, params: dict[str, Any]) -> dict[str, Any]:
    wrapped = wrap_key_material(params["PublicKey"], "RSAES_OAEP_SHA_256", os.urandom(32))
    return call(node, caller, "ImportKeyMaterial", {"KeyId": key_id, "ImportToken": params["ImportToken"],
                                                   "EncryptedKeyMaterial": wrapped,
                                                   "ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE"})


def test_an_expired_token_stays_expired_after_its_row_is_purged(node: Node) -> None:
    caller, clock = setup(node)
    key_id = call(node, caller, "CreateKey", {"Origin": "EXTERNAL"})["KeyMetadata"]["KeyId"]
    params = parameters(node, caller, key_id)
    assert params["ParametersValidTo"] == clock.now + timedelta(hours=24)

    clock.now += timedelta(hours=24, seconds=1)
    with pytest.raises(ExpiredImportTokenException):
        import_with(node, caller, key_id, params)
    run_scheduled_work(node.service)  # purges the token's row
    with node.store.begin() as tx:
        assert tx.conn.exec_driver_sql("SELECT count(*) FROM import_tokens").scalar_one() == 0
    with pytest.raises(ExpiredImportTokenException):
        import_with(node, caller, key_id, params)
    clock.now += timedelta(days=400)
    with pytest.raises(ExpiredImportTokenException):
        import_with(node, caller, key_id, params)


def test_tokens_the_store_did_not_issue_for_the_key_are_invalid(node: Node) -> None:
    caller, clock = setup(node)
    a = call(node, caller, "CreateKey", {"Origin": "EXTERNAL"})["KeyMetadata"]["KeyId"]
    b = call(node, caller, "CreateKey", {"Origin": "EXTERNAL"})["KeyMetadata"]["KeyId"]
    params_a = parameters(node, caller, a)
    with pytest.raises(InvalidImportTokenException):  # another key's token
        import_with(node, caller, b, params_a)
    clock.now += timedelta(days=2)
    run_scheduled_work(node.service)
    with pytest.raises(InvalidImportTokenException):  # another key's token, expired and purged
        import_with(node, caller, b, params_a)
    for forged in (os.urandom(32), params_a["ImportToken"][:-1] + bytes([params_a["ImportToken"][-1] ^ 1]), b"x"):
        with pytest.raises(InvalidImportTokenException):
            import_with(node, caller, a, {**params_a, "ImportToken": forged})
    # A fresh token works, and only once its key is the right one.
    fresh = parameters(node, caller, a)
    assert import_with(node, caller, a, fresh)["KeyId"].endswith(a)
