"""Custom key stores: CreateCustomKeyStore, DescribeCustomKeyStores, UpdateCustomKeyStore,
ConnectCustomKeyStore, DisconnectCustomKeyStore, DeleteCustomKeyStore, as AWS defines them, for
both types: AWS_CLOUDHSM (a PKCS#11 token, here) and EXTERNAL_KEY_STORE (an XKS proxy: what is
particular to it is in xks.py).

A CloudHSM-type store names an HSM cluster an operator registered (a PKCS#11 token) and holds the
password (PIN) of the token's user, sealed under the root key and never returned. A cluster is
registered for one account, and only that account may make a key store on it (one store per
cluster); for any other account it does not exist. Its connection state is in the store, shared by
every node; each node opens the token itself. Connecting logs in at once: the state is CONNECTING
meanwhile (so that no update or delete slips in), then CONNECTED, or FAILED with AWS's
ConnectionErrorCode.
"""

from __future__ import annotations

import logging
import secrets

from ..crypto.certificates import same_certificate
from ..errors import (
    AlreadyExistsException,
    CloudHsmClusterInUseException,
    CloudHsmClusterNotFoundException,
    CloudHsmClusterNotRelatedException,
    CustomKeyStoreHasCMKsException,
    CustomKeyStoreInvalidStateException,
    CustomKeyStoreNameInUseException,
    CustomKeyStoreNotFoundException,
    IncorrectTrustAnchorException,
    KeyStoreUnavailable,
    LimitExceededException,
    ValidationException,
)
from ..keystore.pkcs11 import ConnectError
from ..model import Caller, ConnectionState, CustomKeyStore, HsmCluster
from ..storage import Tx
from . import xks
from .context import Context, Params, Result
from .paging import decode_marker, limit_of, page

log = logging.getLogger("openkms.service")

MAX_KEY_STORES = 10  # per account and region, as in AWS
CLOUDHSM = "AWS_CLOUDHSM"


def _store_of(ctx: Context, caller: Caller, p: Params) -> CustomKeyStore:
    """The caller's custom key store named by CustomKeyStoreId (a store of another account is not found)."""
    with ctx.store.begin() as tx:
        row = tx.key_stores.get(p["CustomKeyStoreId"])
    if row is None or row.account_id != caller.account_id:
        raise CustomKeyStoreNotFoundException(f"Custom key store {p['CustomKeyStoreId']} does not exist.")
    return row


def _cluster(tx: Tx, caller: Caller, cluster_id: str) -> HsmCluster:
    """The cluster, if it is registered for the caller's account (for any other, it does not exist)."""
    cluster = tx.clusters.get(cluster_id)
    if cluster is None or cluster.account_id != caller.account_id:
        raise CloudHsmClusterNotFoundException(f"CloudHSM cluster {cluster_id} does not exist.")
    return cluster


def _check_cluster_free(tx: Tx, cluster_id: str, except_store: str | None = None) -> None:
    if any(s.custom_key_store_id != except_store for s in tx.key_stores.on_cluster(cluster_id)):
        raise CloudHsmClusterInUseException(
            f"CloudHSM cluster {cluster_id} is already associated with a custom key store in this account.")


def _name_in_use(name: str) -> CustomKeyStoreNameInUseException:
    return CustomKeyStoreNameInUseException(f"A custom key store named {name} exists.")


def create_custom_key_store(ctx: Context, caller: Caller, p: Params) -> Result:
    store_type = p.get("CustomKeyStoreType") or CLOUDHSM
    if store_type == xks.EXTERNAL:
        config, secret = xks.new_store_config(ctx, p)
    else:
        if any(p.get(m) is not None for m in xks.XKS_MEMBERS):
            raise ValidationException(f"XksProxy* members are only valid for a custom key store of type "
                                      f"{xks.EXTERNAL}.")
        for member in ("CloudHsmClusterId", "TrustAnchorCertificate", "KeyStorePassword"):
            if p.get(member) is None:
                raise ValidationException(f"{member} is required for a custom key store of type {CLOUDHSM}.")
    ctx.access.authorize_identity(caller, "CreateCustomKeyStore")
    cks_id = "cks-" + secrets.token_hex(9)[:17]

    def common_checks(tx: Tx) -> None:
        if tx.key_stores.by_name(caller.account_id, p["CustomKeyStoreName"]) is not None:
            raise _name_in_use(p["CustomKeyStoreName"])
        if tx.key_stores.count(caller.account_id) >= MAX_KEY_STORES:
            raise LimitExceededException(f"An account can have at most {MAX_KEY_STORES} custom key stores.")

    try:
        if store_type == xks.EXTERNAL:
            with ctx.store.begin() as tx:  # what can be refused without the proxy, first
                common_checks(tx)
                xks.check_uri_free(tx, caller.account_id, config)
            # As AWS: the proxy must answer GetHealthStatus with these values before they are saved.
            xks.check_health(ctx.keystores.xks_client(cks_id, config, secret))
            with ctx.store.begin() as tx:
                common_checks(tx)
                xks.check_uri_free(tx, caller.account_id, config)
                tx.key_stores.insert(CustomKeyStore(cks_id, caller.account_id, p["CustomKeyStoreName"], xks.EXTERNAL,
                                                    None, ConnectionState.DISCONNECTED, None, ctx.now(), config),
                                     ctx.keystores.seal_password(cks_id, secret.reveal()))
            return {"CustomKeyStoreId": cks_id}
        with ctx.store.begin() as tx:
            cluster = _cluster(tx, caller, p["CloudHsmClusterId"])
            if not same_certificate(p["TrustAnchorCertificate"], cluster.trust_anchor):
                raise IncorrectTrustAnchorException(
                    f"The trust anchor certificate is not the one of CloudHSM cluster {cluster.cluster_id}.")
            common_checks(tx)
            _check_cluster_free(tx, cluster.cluster_id)
            tx.key_stores.insert(CustomKeyStore(cks_id, caller.account_id, p["CustomKeyStoreName"], CLOUDHSM,
                                                cluster.cluster_id, ConnectionState.DISCONNECTED, None, ctx.now()),
                                 ctx.keystores.seal_password(cks_id, p["KeyStorePassword"]))
    except AlreadyExistsException:  # a concurrent create took the name first
        raise _name_in_use(p["CustomKeyStoreName"]) from None
    return {"CustomKeyStoreId": cks_id}


def _entry(ctx: Context, row: CustomKeyStore, clusters: dict[str, HsmCluster]) -> Result:
    entry: Result = {"CustomKeyStoreId": row.custom_key_store_id, "CustomKeyStoreName": row.name,
                     "CustomKeyStoreType": row.store_type, "ConnectionState": row.connection_state.value,
                     "CreationDate": row.created}
    if row.cluster_id:
        entry["CloudHsmClusterId"] = row.cluster_id
        cluster = clusters.get(row.cluster_id)
        if cluster is not None:
            entry["TrustAnchorCertificate"] = cluster.trust_anchor
    if row.xks is not None:
        entry.update(xks.entry_members(row, ctx.keystores.xks_health(row.custom_key_store_id)))
    if row.connection_state is ConnectionState.FAILED and row.connection_error_code:
        entry["ConnectionErrorCode"] = row.connection_error_code
    return entry


def describe_custom_key_stores(ctx: Context, caller: Caller, p: Params) -> Result:
    ctx.access.authorize_identity(caller, "DescribeCustomKeyStores")
    if p.get("CustomKeyStoreId") and p.get("CustomKeyStoreName"):
        raise ValidationException("Specify CustomKeyStoreId or CustomKeyStoreName, not both.")
    limit = limit_of(p, 1000)
    with ctx.store.begin() as tx:
        if p.get("CustomKeyStoreId") or p.get("CustomKeyStoreName"):
            one = tx.key_stores.get(p["CustomKeyStoreId"]) if p.get("CustomKeyStoreId") else \
                tx.key_stores.by_name(caller.account_id, p["CustomKeyStoreName"])
            if one is None or one.account_id != caller.account_id:
                raise CustomKeyStoreNotFoundException("The custom key store does not exist.")
            rows = [one]
        else:
            rows = tx.key_stores.for_account(caller.account_id, decode_marker(p.get("Marker")), limit + 1)
        clusters = {c.cluster_id: c for c in tx.clusters.all()}
    return page(rows, limit, lambda r: r.custom_key_store_id, "CustomKeyStores", lambda r: _entry(ctx, r, clusters))


def update_custom_key_store(ctx: Context, caller: Caller, p: Params) -> Result:
    ctx.access.authorize_identity(caller, "UpdateCustomKeyStore")
    row = _store_of(ctx, caller, p)
    # AWS: the name changes while CONNECTED or DISCONNECTED, and so do an external key store's
    # credential and URI path; everything else only while DISCONNECTED.
    if row.store_type == xks.EXTERNAL:
        for member in ("KeyStorePassword", "CloudHsmClusterId"):
            if p.get(member) is not None:
                raise ValidationException(f"{member} is only valid for a custom key store of type {CLOUDHSM}.")
        needs_disconnected = any(p.get(m) is not None for m in xks.XKS_NEEDS_DISCONNECTED)
    else:
        if any(p.get(m) is not None for m in xks.XKS_MEMBERS):
            raise ValidationException(f"XksProxy* members are only valid for a custom key store of type "
                                      f"{xks.EXTERNAL}.")
        needs_disconnected = bool(p.get("KeyStorePassword") or p.get("CloudHsmClusterId"))
    allowed = (ConnectionState.DISCONNECTED,) if needs_disconnected else \
        (ConnectionState.DISCONNECTED, ConnectionState.CONNECTED)
    if row.connection_state not in allowed:
        raise _must_be_disconnected(row.custom_key_store_id, "updated")
    values: dict[str, object] = {}
    proxy = xks.updated_config(ctx, row, p) if row.store_type == xks.EXTERNAL else None
    if proxy is not None:
        config, secret = proxy
        with ctx.store.begin() as tx:
            xks.check_uri_free(tx, caller.account_id, config, except_store=row.custom_key_store_id)
        # As AWS: the proxy must answer GetHealthStatus with the new values before they are saved.
        xks.check_health(ctx.keystores.xks_client(row.custom_key_store_id, config, secret))
        values["xks"] = config
        if secret is not None:
            values["sealed_password"] = ctx.keystores.seal_password(row.custom_key_store_id, secret.reveal())
    try:
        with ctx.store.begin() as tx:
            if p.get("NewCustomKeyStoreName") and p["NewCustomKeyStoreName"] != row.name:
                if tx.key_stores.by_name(caller.account_id, p["NewCustomKeyStoreName"]) is not None:
                    raise _name_in_use(p["NewCustomKeyStoreName"])
                values["name"] = p["NewCustomKeyStoreName"]
            if p.get("CloudHsmClusterId") and p["CloudHsmClusterId"] != row.cluster_id:
                new = _cluster(tx, caller, p["CloudHsmClusterId"])
                old = tx.clusters.get(row.cluster_id) if row.cluster_id else None
                if old is not None and not same_certificate(new.trust_anchor, old.trust_anchor):
                    raise CloudHsmClusterNotRelatedException(
                        f"CloudHSM cluster {new.cluster_id} is not related to {row.cluster_id}.")
                _check_cluster_free(tx, new.cluster_id, except_store=row.custom_key_store_id)
                values["cluster_id"] = new.cluster_id
            if p.get("KeyStorePassword"):
                values["sealed_password"] = ctx.keystores.seal_password(row.custom_key_store_id,
                                                                        p["KeyStorePassword"])
            # Only while still in that state: a Connect that began meanwhile checks what it read.
            if values and not tx.key_stores.update(row.custom_key_store_id, only_if=allowed, **values):
                raise _must_be_disconnected(row.custom_key_store_id, "updated")
    except AlreadyExistsException:
        raise _name_in_use(p["NewCustomKeyStoreName"]) from None
    return {}


def _must_be_disconnected(cks_id: str, to_be: str) -> CustomKeyStoreInvalidStateException:
    return CustomKeyStoreInvalidStateException(f"Custom key store {cks_id} must be DISCONNECTED to be {to_be}.")


def connect_custom_key_store(ctx: Context, caller: Caller, p: Params) -> Result:
    ctx.access.authorize_identity(caller, "ConnectCustomKeyStore")
    row = _store_of(ctx, caller, p)
    if row.connection_state in (ConnectionState.DISCONNECTING, ConnectionState.FAILED):
        raise CustomKeyStoreInvalidStateException(
            f"Custom key store {row.custom_key_store_id} is {row.connection_state.value}: disconnect it first.")
    if row.connection_state is ConnectionState.CONNECTED:
        return {}
    cks_id = row.custom_key_store_id
    # CONNECTING while the token is tried, so that no Update or Delete changes the store meanwhile
    # (a store left CONNECTING by a crash is connected again, or disconnected, as in AWS).
    with ctx.store.begin() as tx:
        if not tx.key_stores.update(cks_id, only_if=(ConnectionState.DISCONNECTED, ConnectionState.CONNECTING),
                                    connection_state=ConnectionState.CONNECTING, connection_error_code=None):
            return {}  # another call connected or disconnected it meanwhile
    if row.store_type == xks.EXTERNAL:
        # The proxy must answer GetHealthStatus (AWS connects the same way).
        try:
            code, why = xks.connection_error(ctx.keystores.xks_client(cks_id))
        except KeyStoreUnavailable as exc:
            code, why = "XKS_PROXY_INVALID_CONFIGURATION", exc.message
        if why is not None:
            log.warning("external key store %s failed to connect: %s (%s)", cks_id, code, why)
        state = ConnectionState.FAILED if code else ConnectionState.CONNECTED
    else:
        try:
            with ctx.store.begin() as tx:
                cluster = tx.clusters.get(row.cluster_id) if row.cluster_id else None
            if cluster is None or cluster.account_id != row.account_id:
                raise ConnectError("CLUSTER_NOT_FOUND", "the store's cluster is not registered for its account")
            ctx.keystores.token_session(cks_id).check()
            state, code = ConnectionState.CONNECTED, None
        except ConnectError as exc:
            state, code = ConnectionState.FAILED, exc.code
    with ctx.store.begin() as tx:
        # Not if a Disconnect came meanwhile: then the store stays DISCONNECTED.
        tx.key_stores.update(cks_id, only_if=ConnectionState.CONNECTING, connection_state=state,
                             connection_error_code=code)
    return {}


def disconnect_custom_key_store(ctx: Context, caller: Caller, p: Params) -> Result:
    ctx.access.authorize_identity(caller, "DisconnectCustomKeyStore")
    row = _store_of(ctx, caller, p)
    if row.connection_state in (ConnectionState.DISCONNECTING, ConnectionState.DISCONNECTED):
        raise CustomKeyStoreInvalidStateException(
            f"Custom key store {row.custom_key_store_id} is already {row.connection_state.value}.")
    with ctx.store.begin() as tx:
        tx.key_stores.update(row.custom_key_store_id, connection_state=ConnectionState.DISCONNECTED,
                             connection_error_code=None)
    return {}


def delete_custom_key_store(ctx: Context, caller: Caller, p: Params) -> Result:
    ctx.access.authorize_identity(caller, "DeleteCustomKeyStore")
    row = _store_of(ctx, caller, p)
    if row.connection_state is not ConnectionState.DISCONNECTED:
        raise _must_be_disconnected(row.custom_key_store_id, "deleted")
    with ctx.store.begin() as tx:
        # Locked, and read again: a Connect or a CreateKey may have come since.
        locked = tx.key_stores.get(row.custom_key_store_id, for_update=True)
        if locked is None:
            raise CustomKeyStoreNotFoundException(f"Custom key store {row.custom_key_store_id} does not exist.")
        if locked.connection_state is not ConnectionState.DISCONNECTED:
            raise _must_be_disconnected(row.custom_key_store_id, "deleted")
        if tx.key_stores.key_count(row.custom_key_store_id):
            raise CustomKeyStoreHasCMKsException(
                f"Custom key store {row.custom_key_store_id} holds KMS keys: delete them first.")
        tx.key_stores.delete(row.custom_key_store_id)
    return {}


def connected_store_of(ctx: Context, caller: Caller, cks_id: str) -> CustomKeyStore:
    """For CreateKey and GenerateRandom: the caller's store, which must be connected."""
    row = _store_of(ctx, caller, {"CustomKeyStoreId": cks_id})
    if row.connection_state is not ConnectionState.CONNECTED:
        raise CustomKeyStoreInvalidStateException(f"Custom key store {cks_id} is not connected.")
    return row

