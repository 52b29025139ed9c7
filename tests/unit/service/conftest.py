"""In-process service tests: a node over SQLite in tmp_path, the memory key store (or the software
store where a test needs asymmetric keys or imports), and a clock the test moves."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from openkms.config import Settings
from openkms.keystore.memory import MemoryKeyStore
from openkms.model import Caller
from openkms.node import Node, open_node
from openkms.service import OPERATIONS

ACCOUNT = "111122223333"


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class Service:
    """Calls operations the way the API does (by name, through the table), as a given caller."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.clock = Clock()
        node.service.clock = self.clock
        node.accounts.bootstrap(ACCOUNT, None, None)
        self.admin = self.caller(ACCOUNT, "admin")

    def caller(self, account_id: str, user: str) -> Caller:
        return Caller(self.node.accounts.user(account_id, user), "AKIA-TEST")

    def user(self, account_id: str, name: str, policy: str | None = None, admin: bool = False) -> Caller:
        if account_id not in {a.account_id for a in self.node.accounts.list_accounts()}:
            self.node.accounts.create_account(account_id, account_id)
        self.node.accounts.create_user(account_id, name, is_admin=admin)
        if policy:
            self.node.accounts.put_user_policy(account_id, name, "p", policy)
        return self.caller(account_id, name)

    def __call__(self, operation: str, caller: Caller | None = None, **params: Any) -> dict[str, Any]:
        who = (caller or self.admin).for_operation(operation, tuple(params.get("GrantTokens") or ()))
        return OPERATIONS[operation].handler(self.node.service, who, params)

    def key(self, **params: Any) -> dict[str, Any]:
        return self("CreateKey", **params)["KeyMetadata"]  # type: ignore[no-any-return]


def _service(tmp_path: Path, memory: bool) -> Iterator[Service]:
    node = open_node(Settings(data_dir=tmp_path / "data"), keystore=MemoryKeyStore() if memory else None)
    try:
        yield Service(node)
    finally:
        node.close()


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    """Over the memory key store: symmetric keys only."""
    yield from _service(tmp_path, memory=True)


@pytest.fixture
def software_svc(tmp_path: Path) -> Iterator[Service]:
    """Over the software key store (sealed under a root key file in tmp_path)."""
    yield from _service(tmp_path, memory=False)
