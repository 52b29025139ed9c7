"""Dev mode (`openkms serve --dev`): an ephemeral, unauthenticated server for laptops and test suites,
as `vault server -dev` and LocalStack are.

What differs from a normal server lives here, and only `openkms serve --dev` wires it in (it hands
granian this module's `create_app` instead of api.app's, over a data dir it made and marked):

- `DevVerifier`: an access key the store knows is verified as on any server (a wrong secret, an
  inactive key: refused). Any other well-formed access key id, with any secret, is the dev
  account's administrator, its signature unchecked (the server cannot know a secret it never
  issued): LocalStack's convention, so that `test`/`test` works. The Authorization header must
  still be SigV4 with this server's region and the API's service in its scope.
- `POST /_openkms/reset` empties the store between tests: every key, alias, grant, secret, custom
  key store, user, access key and account, except the dev account, its administrator and that
  administrator's first access key, so that the same credentials keep working. The audit log is
  kept (it is append-only, hash-chained; it goes with the data dir at exit), and the reset itself
  is recorded in it. Every cache of the node is dropped (`Changes.everything`).

This is unauthenticated by design: hence loopback only, and the warning at every start.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import orjson
from sqlalchemy import delete

from ..accounts import Accounts
from ..audit.record import build_event, new_id
from ..config import Settings
from ..errors import ConfigurationError, KMSError, UnknownOperationException, UnrecognizedClientException
from ..lane import Lane
from ..model import Principal
from ..node import Node, serving_node
from ..onloop import OnLoop
from ..storage import Store, Tx
from ..storage import schema as t
from .app import App, Event, Response, configure_logging
from .sigv4 import SigV4Verifier, parse_authorization

DEFAULT_ACCOUNT_ID = "000000000000"
ACCESS_KEY_ID = "test"  # what the banner prints; any other well-formed id works the same
SECRET_ACCESS_KEY = "test"
RESET_PATH = "/_openkms/reset"
MARKER = "openkms-dev"  # in the data dir `serve --dev` made: the dev account id
ADMIN_USER = "admin"  # the bootstrap administrator's user name (Accounts.bootstrap)
_WELL_FORMED = re.compile(r"^[A-Za-z0-9]{1,128}\Z")
# Kept by a reset: what the store needs to be this store (schema version, region, root key check,
# audit signing key) and the audit log, which is append-only.
_KEPT_TABLES = {t.meta.name, t.audit_events.name, t.audit_digests.name, t.audit_pending.name}


class DevVerifier(SigV4Verifier[Principal]):
    """SigV4 for known access keys; any other well-formed access key id is `administrator`."""

    def __init__(self, region: str, accounts: Accounts, administrator: Principal) -> None:
        super().__init__(region, "kms", accounts.credentials)
        self._accounts = accounts
        self.administrator = administrator

    def verify(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
               now: datetime | None = None, service: str | None = None) -> tuple[Principal, str]:
        auth = parse_authorization(headers)
        if not _WELL_FORMED.match(auth.access_key_id):
            raise UnrecognizedClientException("The security token included in the request is invalid.")
        if self.knows(auth.access_key_id):
            return super().verify(method, path, query, headers, body, now, service)
        self.check_scope(auth, service or self.service)
        return self.administrator, auth.access_key_id

    def knows(self, access_key_id: str) -> bool:
        """Whether the store holds this access key, active or not (an inactive one is refused, not
        taken for the administrator)."""
        if self._accounts.credentials(access_key_id) is not None:
            return True
        try:
            self._accounts.owner_of_access_key(access_key_id)
        except KMSError:
            return False
        return True


class DevApp(App):
    def __init__(self, node: Node, account_id: str) -> None:
        super().__init__(node)
        administrator = node.accounts.user(account_id, ADMIN_USER)
        self.verifier = DevVerifier(node.settings.region, node.accounts, administrator)
        self.dev_account_id = account_id
        with node.store.begin() as tx:  # what a reset keeps: the store as `serve --dev` made it
            self._kept_principals = {administrator.principal_id}
            self._kept_access_keys = {row.access_key_id for row in tx.accounts.access_keys(administrator.principal_id)}

    def handle(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
               source_ip: str = "") -> tuple[Response, Event | None, bool]:
        if path == RESET_PATH:
            return self._reset_call(method, headers, source_ip)
        return super().handle(method, path, query, headers, body, source_ip)

    def _blocking(self, headers: dict[str, str], body: bytes, path: str = "/") -> bool | Lane | OnLoop:
        return path == RESET_PATH or super()._blocking(headers, body, path)  # a reset waits on the store

    def _caller_account(self, headers: dict[str, str]) -> str | None:
        found = super()._caller_account(headers)
        return found if found is not None else self.dev_account_id

    def _reset_call(self, method: str, headers: dict[str, str], source_ip: str
                    ) -> tuple[Response, Event | None, bool]:
        request_id = new_id()
        out_headers = [("content-type", "application/json"), ("x-amzn-requestid", request_id)]
        if method != "POST":
            exc = UnknownOperationException(f"No operation at {method} {RESET_PATH}: reset with POST.")
            return (exc.status, out_headers, orjson.dumps({"__type": exc.code, "message": exc.message})), None, False

        def event(error: KMSError | None) -> Event:
            return build_event(
                request_id=request_id, event_id=event_id, event_time=time.time(), event_name="Reset",
                region=self.settings.region, source_ip=source_ip, user_agent=headers.get("user-agent", ""),
                principal=None, access_key_id=None, request_parameters=None,
                response_elements=None if error else {"reset": True}, error_code=error.code if error else None,
                error_message=error.message if error else None, resources=[], read_only=False,
                event_source="openkms.dev")

        event_id = new_id()
        try:
            self.reset(event(None) if self.audit_enabled else None)
        except KMSError as exc:
            return (exc.status, out_headers, orjson.dumps({"__type": exc.code, "message": exc.message})), \
                event(exc), False
        return (200, out_headers, orjson.dumps({"reset": True})), event(None), self.audit_enabled

    def reset(self, intent: Event | None = None) -> None:
        """Empty the store but for the dev account, its administrator and that one's first access
        key, in one transaction; `intent`: the reset's audit intent, written in that transaction."""
        audit = self.audit

        def write_intent(tx: Tx) -> None:
            if intent is not None:
                audit.write_intent(tx, intent)

        reset_store(self.node.store, self.dev_account_id, self._kept_principals, self._kept_access_keys,
                    write_intent)


def reset_store(store: Store, account_id: str, principals: set[str], access_keys: set[str],
                also: Callable[[Tx], None] | None = None) -> None:
    """Delete every row but the audit log's, the store's own and the kept account, principals and
    access keys, in one transaction (and run `also` in it)."""
    with store.begin() as tx:
        for table in reversed(t.metadata.sorted_tables):  # dependents first
            if table.name in _KEPT_TABLES:
                continue
            statement = delete(table)
            if table is t.accounts:
                statement = statement.where(t.accounts.c.account_id != account_id)
            elif table is t.principals:
                statement = statement.where(t.principals.c.principal_id.not_in(principals))
            elif table is t.access_keys:
                statement = statement.where(t.access_keys.c.access_key_id.not_in(access_keys))
            tx.conn.execute(statement)
        if also is not None:
            also(tx)
        tx.changes.everything = True  # every cache of this node drops what it holds, once this commits


def mark_data_dir(data_dir: Path, account_id: str) -> None:
    """Mark a data dir `serve --dev` made, naming the dev account."""
    (data_dir / MARKER).write_text(f"{account_id}\n")


def create_app(settings: Settings | None = None) -> DevApp:
    """The dev server's app (granian's factory for `openkms serve --dev`). It serves only a data dir
    that `serve --dev` made and marked, and never a non-loopback address."""
    settings = settings or Settings.from_env()
    marker = settings.data_dir / MARKER
    try:
        account_id = marker.read_text().strip()
    except OSError:
        raise ConfigurationError(f"dev mode serves only a data dir that `openkms serve --dev` made (no {marker})"
                                 ) from None
    if settings.check_exposure() is not None or settings.tls_cert or not settings.is_embedded:
        raise ConfigurationError("dev mode serves only loopback, without TLS, from its own temporary store")
    configure_logging(settings)
    return DevApp(serving_node(settings), account_id)


def banner(endpoint: str, settings: Settings, account_id: str, data_dir: Path) -> list[str]:
    """What `serve --dev` prints at start: the warning, the account, and the lines to export."""
    quotas = "on (AWS's request quotas: ThrottlingException past them)" if settings.quotas else \
        "off (OPENKMS_QUOTAS=on for AWS's request quotas)"
    return [
        f"openkms dev server on {endpoint}",
        "WARNING: dev mode: NOT authenticated (any access key id with any secret is this account's "
        "administrator) and the store is temporary (deleted when the server stops). Never keep real keys in it.",
        f"  account id:  {account_id}",
        f"  region:      {settings.region}",
        f"  storage:     sqlite in {data_dir} (deleted at exit)",
        "  audit:       " + ("on" if settings.audit.lower() != "off" else "off (OPENKMS_AUDIT=off)"),
        f"  quotas:      {quotas}",
        f"  reset:       curl -X POST {endpoint}{RESET_PATH}",
        "",
        f"export AWS_ENDPOINT_URL={endpoint} AWS_ACCESS_KEY_ID={ACCESS_KEY_ID} "
        f"AWS_SECRET_ACCESS_KEY={SECRET_ACCESS_KEY} AWS_DEFAULT_REGION={settings.region} AWS_REGION={settings.region}",
    ]


def checked_account_id(value: str) -> str:
    if not re.fullmatch(r"[0-9]{12}", value):
        raise ConfigurationError(f"bad dev-account-id {value!r} (--dev-account-id or OPENKMS_DEV_ACCOUNT_ID): "
                                 "an account id is 12 digits")
    return value

