"""Import tokens over their lifetime, with a clock we move: ExpiredImportTokenException once the
24 hours have passed, also after the scheduler has purged the token's row;
InvalidImportTokenException for anything the store did not issue for that key."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pytest

from openkms.client.byok import wrap_key_material
from openkms.errors import ExpiredImportTokenException, InvalidImportTokenException
from openkms.service import run_scheduled_work
from tests.unit.service.conftest import Service


def parameters(svc: Service, key_id: str) -> dict[str, Any]:
    return svc("GetParametersForImport", KeyId=key_id, WrappingAlgorithm="RSAES_OAEP_SHA_256",
               WrappingKeySpec="RSA_2048")


def import_with(svc: Service, key_id: str, params: dict[str, Any]) -> dict[str, Any]:
    wrapped = wrap_key_material(params["PublicKey"], "RSAES_OAEP_SHA_256", os.urandom(32))
    return svc("ImportKeyMaterial", KeyId=key_id, ImportToken=params["ImportToken"], EncryptedKeyMaterial=wrapped,
               ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")


def test_an_expired_token_stays_expired_after_its_row_is_purged(software_svc: Service) -> None:
    svc = software_svc
    key_id = svc.key(Origin="EXTERNAL")["KeyId"]
    params = parameters(svc, key_id)
    assert params["ParametersValidTo"] == svc.clock.now + timedelta(hours=24)

    svc.clock.advance(hours=24, seconds=1)
    with pytest.raises(ExpiredImportTokenException):
        import_with(svc, key_id, params)
    run_scheduled_work(svc.node.service)  # purges the token's row
    with svc.node.store.begin() as tx:
        assert tx.conn.exec_driver_sql("SELECT count(*) FROM import_tokens").scalar_one() == 0
    with pytest.raises(ExpiredImportTokenException):
        import_with(svc, key_id, params)
    svc.clock.advance(days=400)
    with pytest.raises(ExpiredImportTokenException):
        import_with(svc, key_id, params)


def test_tokens_the_store_did_not_issue_for_the_key_are_invalid(software_svc: Service) -> None:
    svc = software_svc
    a = svc.key(Origin="EXTERNAL")["KeyId"]
    b = svc.key(Origin="EXTERNAL")["KeyId"]
    params_a = parameters(svc, a)
    with pytest.raises(InvalidImportTokenException):  # another key's token
        import_with(svc, b, params_a)
    svc.clock.advance(days=2)
    run_scheduled_work(svc.node.service)
    with pytest.raises(InvalidImportTokenException):  # another key's token, expired and purged
        import_with(svc, b, params_a)
    token = params_a["ImportToken"]
    for forged in (os.urandom(32), token[:-1] + bytes([token[-1] ^ 1]), b"x"):
        with pytest.raises(InvalidImportTokenException):
            import_with(svc, a, {**params_a, "ImportToken": forged})
    # A fresh token works.
    fresh = parameters(svc, a)
    assert import_with(svc, a, fresh)["KeyId"].endswith(a)
