"""Periodic work of a serving node, started from its event loop: the service's scheduled work
(deletions, rotations, expiries), archiving old audit records, and the audit log's ticks (digests,
recovery). The scheduled work and the archiving run off the loop: they read and write the store,
and deleting a key of a custom key store waits on its HSM."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .audit.log import AuditLog
from .audit.verify import archive as archive_audit
from .node import Node
from .secrets import purge_deleted_secrets
from .service import run_scheduled_work

log = logging.getLogger("openkms.scheduler")


def _submit(audit: AuditLog, event: dict[str, Any], intent: bool) -> None:
    audit.submit(event, intent=intent).add_done_callback(_written)


def _written(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("an audit record of a rotation could not be written")


class Scheduler:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        rotation, audit = self.node.rotation, self.node.audit
        if rotation is not None and audit is not None:
            # Rotations run on their own threads; their audit records are appended on the loop.
            def sink(event: dict[str, Any], intent: bool) -> None:
                loop.call_soon_threadsafe(_submit, audit, event, intent)

            rotation.audit_sink = sink
            rotation.write_intent = audit.write_intent
        if not self._tasks:
            self._tasks = [loop.create_task(self._run_scheduled_work()), loop.create_task(self._run_audit_ticks()),
                           loop.create_task(self._poll_xks_health())]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    async def _run_scheduled_work(self) -> None:
        settings, service, rotation = self.node.settings, self.node.service, self.node.rotation
        # Each kind of work on its own: one that fails does not hold up the others.
        works: list[tuple[str, Callable[[], dict[str, list[str]]]]] = [
            ("keys", lambda: run_scheduled_work(service)),
            ("secrets", lambda: {"deleted": purge_deleted_secrets(service)})]
        if rotation is not None:
            works.append(("secrets", lambda: {"started rotating": rotation.run_due()}))
        while True:
            loop = asyncio.get_running_loop()
            for kind, work in works:
                try:
                    done = await loop.run_in_executor(None, work)
                except Exception:
                    log.exception("scheduler run failed (%s); will retry", kind)
                    continue
                for what, ids in done.items():
                    if ids:
                        log.info("scheduler: %s %d %s", what, len(ids), "key(s)" if kind == "keys" else "secret(s)")
            try:
                if settings.audit_retention_days > 0:
                    moved = await asyncio.get_running_loop().run_in_executor(None, self._archive_audit)
                    if moved:
                        log.info("scheduler: archived %d audit record(s)", moved)
            except Exception:
                log.exception("scheduler run failed (archiving audit records); will retry")
            await asyncio.sleep(settings.scheduler_interval)

    def _archive_audit(self) -> int:
        settings, audit = self.node.settings, self.node.audit
        assert audit is not None
        cutoff = time.time() - settings.audit_retention_days * 86400
        return archive_audit(self.node.store, audit.node_id, cutoff, settings.data_dir / "audit-archive")

    async def _poll_xks_health(self) -> None:
        """Each connected external key store's proxy health, for DescribeCustomKeyStores and the log
        (a store stays CONNECTED while its proxy is down, as in AWS: only its keys' calls fail)."""
        keystores = self.node.service.keystores
        while True:
            await asyncio.sleep(self.node.settings.xks_health_interval)
            try:
                if keystores.any_custom_key_stores():
                    await asyncio.get_running_loop().run_in_executor(None, keystores.poll_xks_health)
            except Exception:
                log.exception("external key store health check failed; will retry")

    async def _run_audit_ticks(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                if self.node.audit is not None:
                    self.node.audit.tick()
            except Exception:
                log.exception("audit tick failed; will retry")
