"""Work the scheduler does on every node (scheduler.py runs it): deleting keys whose waiting period
has ended, automatic rotation, expiring imported material, purging expired import tokens.

Each piece is safe to run on many nodes at once: rows are locked for the transaction that changes
them, and a row another node has already handled is skipped.
"""

from __future__ import annotations

import logging

from ..errors import KeyStoreUnavailable
from ..model import KeyState
from .context import Context
from .imports import expire_imported_material
from .rotation import rotate_due_keys

log = logging.getLogger("openkms.scheduler")


def purge_due_keys(ctx: Context) -> list[str]:
    """Really delete every key whose deletion window has ended, with its material, tags and aliases."""
    with ctx.store.begin() as tx:
        due = tx.keys.due_for_deletion(ctx.now())
    for key_id in due:
        with ctx.store.begin() as tx:
            key = tx.keys.get(key_id, for_update=True)
            if key is None or key.state is not KeyState.PENDING_DELETION:
                continue
            if key.deletion_date is None or key.deletion_date > ctx.now():
                continue
            tx.keys.delete(key_id)
        try:
            ctx.keystores.for_key(key).destroy(key)
        except KeyStoreUnavailable:
            # A custom key store that is not connected keeps the object, as in AWS: the KMS key is
            # gone, and an HSM administrator can delete the object (labelled with the key's ARN).
            log.warning("key %s deleted; its material stays in its unreachable key store", key_id)
    return due


def run_scheduled_work(ctx: Context) -> dict[str, list[str]]:
    """One run of the scheduler: what it did, by kind, as key ids."""
    done = {"deleted": purge_due_keys(ctx), "rotated": rotate_due_keys(ctx, ctx.now()),
            "expired": expire_imported_material(ctx, ctx.now())}
    with ctx.store.begin() as tx:
        tx.import_tokens.delete_expired(ctx.now())
    return done
