"""The key store rows' conditional update: a change made `only_if` the store is in a state does
nothing once another call has moved it (Connect against Update, Disconnect against Connect)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from openkms.model import Account, ConnectionState, CustomKeyStore
from openkms.storage import Store


def test_update_only_if_in_state(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        now = datetime.now(UTC)
        with store.begin() as tx:
            tx.accounts.insert(Account("111122223333", "a", now))
            tx.key_stores.insert(CustomKeyStore("cks-1", "111122223333", "s", "AWS_CLOUDHSM", None,
                                                ConnectionState.DISCONNECTED, None, now), None)
        with store.begin() as tx:
            assert tx.key_stores.update("cks-1", only_if=ConnectionState.DISCONNECTED,
                                        connection_state=ConnectionState.CONNECTING)
            # An Update that expects DISCONNECTED now changes nothing.
            assert not tx.key_stores.update("cks-1", only_if=ConnectionState.DISCONNECTED, name="renamed")
            assert tx.key_stores.update("cks-1", only_if=(ConnectionState.DISCONNECTED, ConnectionState.CONNECTING),
                                        connection_state=ConnectionState.CONNECTED)
        with store.begin() as tx:
            row = tx.key_stores.get("cks-1")
        assert row is not None and (row.name, row.connection_state) == ("s", ConnectionState.CONNECTED)
    finally:
        store.close()
