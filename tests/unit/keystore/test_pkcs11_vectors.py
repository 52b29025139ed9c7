"""The format-2 blob vectors (tests/vectors/blob_v2.json) open in a real SoftHSM2 token: the
PKCS#11 store's CKM_AES_GCM computes the very bytes the vectors pin."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from openkms.keystore.pkcs11 import Module, Pkcs11KeyStore, TokenSession, object_id_of
from openkms.model import Key, KeyState, KeyUsage, Origin, SecretStr
from openkms.storage import Store

VECTORS = json.loads((Path(__file__).parents[2] / "vectors" / "blob_v2.json").read_text())
PIN = "vector-pin"


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: f"v2-{len(v['plaintext']) // 2}B")
def test_a_token_opens_the_vectors(v: dict[str, Any], softhsm: Any, tmp_path: Path) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    label = softhsm.init_token(pin=PIN)
    key = Key(key_id=v["key_id"], account_id="111122223333", region="us-east-1", description="",
              key_spec="SYMMETRIC_DEFAULT", key_usage=KeyUsage.ENCRYPT_DECRYPT, origin=Origin.AWS_CLOUDHSM,
              state=KeyState.ENABLED, created=datetime.now(UTC), current_version=v["version"])
    module = Module.load(softhsm.module)
    with module.lock:
        module.reinitialize()  # the token was made after the module was loaded
        session = pkcs11.lib(softhsm.module).get_token(token_label=label).open(user_pin=PIN, rw=True)
        session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                               Attribute.VALUE: bytes.fromhex(v["material"]), Attribute.TOKEN: True,
                               Attribute.ID: object_id_of(key.key_id, key.current_version),
                               Attribute.LABEL: "vector " + uuid.uuid4().hex, Attribute.ENCRYPT: True,
                               Attribute.DECRYPT: True, Attribute.SENSITIVE: True})
        session.close()
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        hsm = Pkcs11KeyStore(store, TokenSession(softhsm.module, label, SecretStr(PIN)), "cluster-vectors")
        assert hsm.decrypt(key, v["version"], bytes.fromhex(v["blob"]), v["context"]) == bytes.fromhex(v["plaintext"])
    finally:
        store.close()
