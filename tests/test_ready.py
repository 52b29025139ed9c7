"""GET /ready: 200 only while the node can serve calls, else 503 with each check and what failed.
Each check is made to fail for real: the audit writer killed, the PostgreSQL store made read-only,
an HSM key store's token taken away. /health stays a cheap liveness answer throughout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg

from tests.conftest import SoftHsm, bootstrap_env
from tests.hsm_helpers import HsmWorld, running, wait_until
from tests.server import ServerProcess


def get(server: ServerProcess, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(server.endpoint + path, timeout=15) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def not_ready_because(server: ServerProcess, check: str) -> dict[str, Any] | None:
    status, body = get(server, "/ready")
    return body if status == 503 and check in body.get("failed", []) else None


def is_ready(server: ServerProcess) -> bool:
    return get(server, "/ready")[0] == 200


def writer_pids(node_id: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"openkms.audit.writer" in cmdline and node_id.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def test_ready_and_a_dead_audit_writer(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", env=bootstrap_env())
    with running(server):
        status, body = get(server, "/ready")
        assert status == 200, body
        assert body == {"status": "ready", "checks": {"store": "ok", "root_key": "ok", "audit": "ok",
                                                      "custom_key_stores": "ok"}}
        node_id = (tmp_path / "data" / "node-id").read_text().strip()
        pids = writer_pids(node_id)
        assert pids, "no audit writer process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not_ready_because(server, "audit") is not None, 10)
        body = not_ready_because(server, "audit")
        assert body is not None and "audit writer" in body["checks"]["audit"]
        assert body["checks"]["store"] == "ok"
        assert get(server, "/health")[0] == 200  # alive, though not ready
        # The next call starts a writer again (that call is refused, fail closed), and the node is ready again.
        kms = server.client(retry=False)
        wait_until(lambda: _call_ok(kms), 10, interval=0.3)
        wait_until(lambda: is_ready(server), 10)


def _call_ok(kms: Any) -> bool:
    try:
        kms.list_keys()
        return True
    except Exception:  # refused while the writer starts again
        return False


def test_a_read_only_store_is_not_ready(pg_url: str, tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", storage_url=pg_url, env=bootstrap_env())
    database = pg_url.rsplit("/", 1)[1]
    admin_url = pg_url.rsplit("/", 1)[0] + "/postgres"

    def read_only(on: bool) -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = {"on" if on else "off"}')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                         "AND pid <> pg_backend_pid()", (database,))

    with running(server):
        assert is_ready(server)
        read_only(True)
        try:
            wait_until(lambda: not_ready_because(server, "store") is not None, 15)
            body = not_ready_because(server, "store")
            assert body is not None and "refused a write" in body["checks"]["store"]
            assert get(server, "/health")[0] == 200
        finally:
            read_only(False)
        wait_until(lambda: is_ready(server), 20, interval=0.3)


def test_an_hsm_key_store_whose_token_is_gone_is_not_ready(softhsm: SoftHsm, tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", env=bootstrap_env())
    with running(server):
        world = HsmWorld(server, softhsm, tmp_path)
        kms = server.client()
        store = world.key_store(kms)
        assert is_ready(server)
        away = tmp_path / "away"
        shutil.move(str(store.cluster.token_dir), str(away))
        try:
            wait_until(lambda: not_ready_because(server, "custom_key_stores") is not None, 15, interval=0.3)
            body = not_ready_because(server, "custom_key_stores")
            assert body is not None and body["failed"] == ["custom_key_stores"]
            assert "1 connected custom key store(s) do not answer" in body["checks"]["custom_key_stores"]
            assert store.cks_id not in json.dumps(body)  # a tenant's store: named in the log only
            assert f"not ready: custom key store {store.cks_id}" in server.output()
        finally:
            shutil.move(str(away), str(store.cluster.token_dir))
        wait_until(lambda: is_ready(server), 15, interval=0.5)  # back without a restart or a reconnect
