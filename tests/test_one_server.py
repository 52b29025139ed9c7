"""One server per port, per data dir and per node id; one region per store: real `openkms serve` processes.

What is tested:
- a port already in use (by another openkms server, or by any listening socket) refuses the start with one
  line on stderr and exit code 2, before anything is written (the data dir is not even created);
- bad ports, hosts and regions, given as flags or OPENKMS_* variables, refuse the start the same way;
- the data dir is locked: a second server on it is refused and names the first one's pid; the kernel drops
  the lock when the holder is killed with SIGKILL, so the next start works;
- on PostgreSQL, nodes with their own data dirs share a store, but a copied data dir (same node id) is
  refused while the original node lives, until its node-id file is deleted;
- `--reuse-port` (or OPENKMS_REUSE_PORT=1) on every server lets them share a port on purpose;
- the region is recorded in the store (or, for an older store, taken from its keys) and a start with another
  region is refused, on SQLite and PostgreSQL.

A refusal is always: exit code 2, exactly one line on stderr starting `openkms: cannot start:`, nothing on
stdout, no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import bootstrap_env, run_sql
from tests.server import ServerProcess, free_port

PREFIX = "openkms: cannot start: "
REFUSAL_TIMEOUT = 15.0  # a refusal takes about a second; a server still running after this did not refuse


def refuse(server: ServerProcess, command: list[str] | None = None) -> str:
    """Run `server` (its command, or `command`, with its environment), which must refuse to start.

    Checks the shape of every refusal and returns its one line (without the trailing newline).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENKMS_")} | server.env
    proc = subprocess.Popen(command or server.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=REFUSAL_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the server did not refuse to start (still running after {REFUSAL_TIMEOUT}s):\n"
                    f"{out.decode(errors='replace')}{err.decode(errors='replace')}")
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    both = stdout + stderr
    assert "Traceback" not in both, both
    assert proc.returncode == 2, f"exit code {proc.returncode}:\n{both}"
    assert stdout == "", both
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"not one line:\n{stderr}"
    assert lines[0].startswith(PREFIX), lines[0]
    return lines[0]


def health(port: int) -> dict[str, str]:
    """GET /health on a new connection."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return dict(json.loads(r.read()))


def recorded_region(data_dir: Path, store_url: str | None) -> bytes | None:
    """The region row of the store's openkms_meta table, read behind the server's back."""
    sql = "SELECT value FROM openkms_meta WHERE name = 'region'"
    if store_url is None:
        with sqlite3.connect(data_dir / "openkms.db") as conn:
            row = conn.execute(sql).fetchone()
    else:
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as pg:
            row = pg.execute(sql).fetchone()
    return None if row is None else bytes(row[0])


# -- the port -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("holder", ["openkms", "socket"])
def test_port_in_use_refuses_the_start_and_writes_nothing(tmp_path: Path, holder: str) -> None:
    first: ServerProcess | None = None
    sock: socket.socket | None = None
    try:
        if holder == "openkms":
            first = ServerProcess(tmp_path / "first", env=bootstrap_env())
            first.start()
            key = first.client().create_key()["KeyMetadata"]["KeyId"]
            port = first.port
        else:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
        second_dir = tmp_path / "second"
        second = ServerProcess(second_dir, env=bootstrap_env(), port=port)
        assert refuse(second) == f"{PREFIX}127.0.0.1:{port} is already in use"
        assert not second_dir.exists()
        if first is not None:
            assert first.proc is not None and first.proc.poll() is None
            for _ in range(5):  # new connections, all answered by the first server and its store
                assert health(port)["status"] == "ok"
            assert first.client().describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Enabled"
    finally:
        if first is not None:
            first.stop()
        if sock is not None:
            sock.close()


@pytest.mark.parametrize(("args", "env", "named"), [
    (["--port", "abc"], {}, "'abc'"),
    (["--port", "70000"], {}, "70000"),
    (["--port", "0"], {}, "bad port 0"),
    ([], {"OPENKMS_PORT": "abc"}, "OPENKMS_PORT"),
    (["--host", "no.such.host.invalid"], {}, "no.such.host.invalid"),
    (["--host", "10.255.255.1"], {}, "10.255.255.1"),
    (["--region", "EU WEST"], {}, "'EU WEST'"),
], ids=["port-abc", "port-70000", "port-0", "env-port-abc", "host-unknown", "host-not-here", "region-bad"])
def test_bad_settings_refuse_the_start(tmp_path: Path, args: list[str], env: dict[str, str], named: str) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, env=bootstrap_env() | env, extra_args=args)
    command = server.command()
    if "OPENKMS_PORT" in env:  # no --port flag, which would override the variable
        at = command.index("--port")
        del command[at:at + 2]
    line = refuse(server, command)
    assert named in line
    assert not data.exists()


# -- the data dir -------------------------------------------------------------------------------------------


def test_data_dir_lock_names_the_holder_and_dies_with_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = bootstrap_env()
    first = ServerProcess(data, env=env)
    third: ServerProcess | None = None
    first.start()
    try:
        assert first.proc is not None
        pid = first.proc.pid
        key = first.client().create_key()["KeyMetadata"]["KeyId"]
        node = (data / "node-id").read_bytes()
        second = ServerProcess(data, env=env, port=free_port())  # another port
        assert second.port != first.port
        line = refuse(second)
        assert line == f"{PREFIX}data dir {data.resolve()} is in use by another openkms server (pid {pid})"
        assert (data / "serve.lock").read_text().strip() == str(pid)  # the refused start left the lock alone
        assert (data / "node-id").read_bytes() == node
        assert first.proc.poll() is None and health(first.port)["status"] == "ok"

        first.stop(signal.SIGKILL)  # no clean-up: the lock file stays, naming a dead pid
        assert (data / "serve.lock").read_text().strip() == str(pid)
        third = ServerProcess(data, env=env)
        third.start()
        assert third.proc is not None
        assert (data / "serve.lock").read_text().strip() == str(third.proc.pid)
        assert third.client().describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Enabled"
    finally:
        first.stop()
        if third is not None:
            third.stop()


# -- the node id on a shared store --------------------------------------------------------------------------


def test_copied_data_dir_is_refused_as_a_second_live_node(tmp_path: Path, pg_url: str) -> None:
    a_dir, b_dir, copy_dir = tmp_path / "a", tmp_path / "b", tmp_path / "copy"
    a = ServerProcess(a_dir, storage_url=pg_url, env=bootstrap_env())
    started: list[ServerProcess] = [a]
    try:
        a.start()
        creds = (a.access_key_id, a.secret_access_key)
        key = a.client().create_key()["KeyMetadata"]["KeyId"]
        a_node = (a_dir / "node-id").read_text().strip()

        # A second node: its own data dir, the same root key, no bootstrap variables (the store has an admin).
        b_dir.mkdir()
        shutil.copy2(a_dir / "root.key", b_dir / "root.key")
        b = ServerProcess(b_dir, storage_url=pg_url)
        started.append(b)
        b.start()
        assert b.client(*creds).describe_key(KeyId=key)["KeyMetadata"]["KeyId"] == key
        b_node = (b_dir / "node-id").read_text().strip()
        assert b_node != a_node

        # A copy of the first node's data dir, started while the first node lives: the same node id.
        shutil.copytree(a_dir, copy_dir)
        (copy_dir / "serve.lock").unlink()
        copy = ServerProcess(copy_dir, storage_url=pg_url)
        line = refuse(copy)
        assert a_node in line
        assert f"delete {copy_dir.resolve() / 'node-id'}" in line
        assert (copy_dir / "node-id").read_text().strip() == a_node
        assert a.proc is not None and a.proc.poll() is None
        assert b.proc is not None and b.proc.poll() is None

        (copy_dir / "node-id").unlink()
        started.append(copy)
        copy.start()
        copy_node = (copy_dir / "node-id").read_text().strip()
        assert copy_node not in (a_node, b_node)
        assert copy.client(*creds).describe_key(KeyId=key)["KeyMetadata"]["KeyId"] == key
        assert a.client().describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Enabled"
    finally:
        for server in started:
            server.stop()


# -- sharing a port on purpose ------------------------------------------------------------------------------


def test_reuse_port_lets_servers_share_a_port_on_request(tmp_path: Path) -> None:
    # Two unrelated stores with different regions, so /health tells which server answered.
    a = ServerProcess(tmp_path / "a", env=bootstrap_env(), extra_args=["--reuse-port"])
    b = ServerProcess(tmp_path / "b", env=bootstrap_env() | {"OPENKMS_REUSE_PORT": "1"}, port=a.port,
                      extra_args=["--region", "eu-west-1"])
    try:
        a.start()
        # A server that did not ask to share the port still cannot take it.
        plain_dir = tmp_path / "plain"
        assert refuse(ServerProcess(plain_dir, env=bootstrap_env(), port=a.port)) == \
            f"{PREFIX}127.0.0.1:{a.port} is already in use"
        assert not plain_dir.exists()

        b.start()  # may return on the first server's /health: wait for the second one's own word
        deadline = time.monotonic() + 20
        while "openkms serving on" not in b.output() and time.monotonic() < deadline:
            assert b.proc is not None and b.proc.poll() is None, b.output()
            time.sleep(0.1)
        assert "openkms serving on" in b.output()
        seen: set[str] = set()
        deadline = time.monotonic() + 20
        while seen != {"us-east-1", "eu-west-1"} and time.monotonic() < deadline:
            seen.add(health(a.port)["region"])  # each call is a new connection; the kernel spreads them
        assert seen == {"us-east-1", "eu-west-1"}, f"only {seen} answered"
        assert a.proc is not None and a.proc.poll() is None
        assert b.proc is not None and b.proc.poll() is None

        a.stop()  # the port stays served by the other one
        assert {health(a.port)["region"] for _ in range(5)} == {"eu-west-1"}
    finally:
        a.stop()
        b.stop()


def test_reuse_port_needs_asking_on_the_first_server_too(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "first", env=bootstrap_env())
    try:
        first.start()
        second_dir = tmp_path / "second"
        second = ServerProcess(second_dir, env=bootstrap_env(), port=first.port, extra_args=["--reuse-port"])
        assert refuse(second) == f"{PREFIX}127.0.0.1:{first.port} is already in use"
        assert not second_dir.exists()
    finally:
        first.stop()


# -- the region ---------------------------------------------------------------------------------------------


def test_region_is_part_of_the_store(tmp_path: Path, store_url: str | None) -> None:
    data = tmp_path / "data"
    env = bootstrap_env()

    def serve_and_describe(key: str | None = None) -> str:
        server = ServerProcess(data, storage_url=store_url, env=env)
        server.start()
        try:
            kms = server.client()
            if key is None:
                key = kms.create_key()["KeyMetadata"]["KeyId"]
            md = kms.describe_key(KeyId=key)["KeyMetadata"]
            assert md["Arn"].startswith("arn:aws:kms:us-east-1:")
            return str(md["KeyId"])
        finally:
            server.stop()

    def refused_in_eu() -> str:
        return refuse(ServerProcess(data, storage_url=store_url, env=env, extra_args=["--region", "eu-west-1"]))

    key = serve_and_describe()
    assert recorded_region(data, store_url) == b"us-east-1"
    assert refused_in_eu().startswith(f"{PREFIX}this store serves region us-east-1, not eu-west-1: ")
    assert serve_and_describe(key) == key

    # A store from before the region was recorded: the region of its keys counts.
    run_sql(data, store_url, "DELETE FROM openkms_meta WHERE name = 'region'")
    assert recorded_region(data, store_url) is None
    assert refused_in_eu().startswith(f"{PREFIX}this store serves region us-east-1, not eu-west-1: ")
    assert serve_and_describe(key) == key
    assert recorded_region(data, store_url) == b"us-east-1"


def test_region_from_the_environment_is_checked_too(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, env=bootstrap_env())
    server.start()
    server.stop()
    line = refuse(ServerProcess(data, env={"OPENKMS_REGION": "ap-south-1"}))
    assert line.startswith(f"{PREFIX}this store serves region us-east-1, not ap-south-1: ")


def test_sighup_under_load_is_ignored_and_loses_nothing(tmp_path: Path) -> None:
    """SIGHUP must not start a second worker of the same node (two writers of one audit chain would
    refuse calls): it is ignored, said so, and every call under load goes on being answered."""
    import threading

    server = ServerProcess(tmp_path / "data", env=bootstrap_env())
    server.start()
    try:
        assert server.proc is not None
        key = server.client().create_key()["KeyMetadata"]["KeyId"]
        failures: list[str] = []
        answered = [0]
        done = threading.Event()

        def load() -> None:
            kms = server.client(retry=False)
            while not done.is_set():
                try:
                    kms.encrypt(KeyId=key, Plaintext=b"x")
                    answered[0] += 1
                except Exception as exc:  # every failure is the finding
                    failures.append(repr(exc)[:200])

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        for _ in range(3):
            os.kill(server.proc.pid, signal.SIGHUP)
            time.sleep(0.5)
        time.sleep(1.0)
        done.set()
        for t in threads:
            t.join()
        assert not failures, failures[:3]
        assert answered[0] > 0
        assert "SIGHUP ignored" in server.output() and "IntegrityError" not in server.output()
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_sigterm_under_load_leaves_a_record_for_every_answer(tmp_path: Path) -> None:
    """A graceful stop: SIGTERM while clients are busy; the server exits 0, and every call that was
    answered has its audit record in the store (the writer is flushed before the process ends).
    No call is cut: a call whose connection closed before an answer came (a keep-alive connection
    the stopping server closed as the client sent on it) was never carried out, so a client may
    send it again (botocore does, by default)."""
    import threading
    import uuid

    from botocore.exceptions import ConnectionClosedError

    server = ServerProcess(tmp_path / "data", env=bootstrap_env())
    server.start()
    assert server.proc is not None
    key = server.client().create_key()["KeyMetadata"]["KeyId"]
    answered: list[str] = []
    closed: list[str] = []  # the marks of calls whose connection closed under them
    done = threading.Event()

    def load() -> None:
        kms = server.client(retry=False)
        while not done.is_set():
            mark = uuid.uuid4().hex
            try:
                answered.append(kms.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext={"mark": mark})[
                    "ResponseMetadata"]["RequestId"])
            except ConnectionClosedError:
                closed.append(mark)
            except Exception:  # refused once the server stops: not answered, not counted
                time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    done.set()
    for t in threads:
        t.join()
    server.stop()
    assert len(answered) > 20
    with sqlite3.connect(tmp_path / "data" / "openkms.db") as db:
        records = [text for (text,) in db.execute("SELECT record FROM audit_events")]
    recorded = {json.loads(text)["event"]["requestID"] for text in records}
    missing = [request_id for request_id in answered if request_id not in recorded]
    assert not missing, f"{len(missing)} of {len(answered)} answered calls have no audit record"
    everything = "\n".join(records)
    cut = [mark for mark in closed if mark in everything]
    assert not cut, f"{len(cut)} of {len(closed)} calls were carried out but their connection closed unanswered"
