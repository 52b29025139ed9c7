"""Shared fixtures: real `openkms serve` processes on loopback ports, driven by boto3.

The `server` fixture is parametrized over the two stores: SQLite (embedded) and PostgreSQL.
PostgreSQL tests read the DSN of a server they may create databases on from
OPENKMS_TEST_POSTGRES_DSN (e.g. postgresql://postgres@127.0.0.1:5432/test); without it they are
skipped with a message. CI sets it, and fails if the database cannot be reached.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.server import ServerProcess

PG_ENV = "OPENKMS_TEST_POSTGRES_DSN"
ACCOUNT_ID = "111122223333"
REGION = "us-east-1"


def pytest_report_header(config: pytest.Config) -> str:
    dsn = os.environ.get(PG_ENV)
    return f"PostgreSQL tests: {'on (' + dsn + ')' if dsn else 'skipped (set ' + PG_ENV + ')'}"


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    dsn = os.environ.get(PG_ENV)
    if not dsn:
        if os.environ.get("OPENKMS_REQUIRE_POSTGRES"):
            pytest.fail(f"OPENKMS_REQUIRE_POSTGRES is set but {PG_ENV} is not")
        pytest.skip(f"PostgreSQL tests need {PG_ENV}=postgresql://user@host:port/db")
    return dsn


@pytest.fixture(scope="session")
def pg_admin(pg_dsn: str) -> Iterator[object]:
    import psycopg

    conn = psycopg.connect(pg_dsn, autocommit=True, connect_timeout=5)
    yield conn
    conn.close()


def new_pg_database(pg_admin: object, pg_dsn: str) -> str:
    """A fresh, empty database on the test server; returns its URL."""
    name = f"openkms_t_{uuid.uuid4().hex[:12]}"
    pg_admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[attr-defined]
    base, _, _ = pg_dsn.rpartition("/")
    return f"{base}/{name}"


def drop_pg_database(pg_admin: object, url: str) -> None:
    name = url.rpartition("/")[2]
    pg_admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[attr-defined]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None for the embedded SQLite store, else a fresh PostgreSQL database URL."""
    if request.param == "sqlite":
        yield None
        return
    admin = request.getfixturevalue("pg_admin")
    url = new_pg_database(admin, request.getfixturevalue("pg_dsn"))
    yield url
    drop_pg_database(admin, url)


Statement = str | tuple[str, tuple[Any, ...]]


def run_sql(data_dir: Path, store_url: str | None, *statements: Statement) -> None:
    """Change the store behind the server's back (tests only): each statement is SQL text, or
    (SQL with ? placeholders, parameters)."""
    pairs = [(s, ()) if isinstance(s, str) else s for s in statements]
    if store_url is None:
        with sqlite3.connect(data_dir / "openkms.db") as conn:
            for sql, params in pairs:
                conn.execute(sql, params)
    else:
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as conn:
            for sql, params in pairs:
                conn.execute(sql.replace("?", "%s") if params else sql, params)  # type: ignore[arg-type]


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh PostgreSQL database for one test."""
    dsn = request.getfixturevalue("pg_dsn")
    admin = request.getfixturevalue("pg_admin")
    url = new_pg_database(admin, dsn)
    yield url
    drop_pg_database(admin, url)


def bootstrap_env() -> dict[str, str]:
    return {
        "OPENKMS_BOOTSTRAP_ACCOUNT_ID": ACCOUNT_ID,
        "OPENKMS_BOOTSTRAP_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "OPENKMS_BOOTSTRAP_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
    }


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A running server with a bootstrapped admin, on SQLite and on PostgreSQL."""
    storage_url = None
    if request.param == "postgres":
        dsn = request.getfixturevalue("pg_dsn")
        admin = request.getfixturevalue("pg_admin")
        storage_url = new_pg_database(admin, dsn)
    data_dir = tmp_path_factory.mktemp("openkms-data")
    proc = ServerProcess(data_dir, storage_url=storage_url, env=bootstrap_env())
    proc.start()
    yield proc
    proc.stop()
    if storage_url:
        drop_pg_database(request.getfixturevalue("pg_admin"), storage_url)


@pytest.fixture(scope="module")
def kms(server: ServerProcess) -> object:
    return server.client()


@pytest.fixture
def key_id(kms: object) -> str:
    return kms.create_key(Description="test key")["KeyMetadata"]["KeyId"]  # type: ignore[attr-defined]


def boto_client(endpoint: str, access_key_id: str, secret: str, service: str = "kms",
                validate: bool = True) -> object:
    return boto3.client(
        service, endpoint_url=endpoint, region_name=REGION,
        aws_access_key_id=access_key_id, aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}, parameter_validation=validate))


@pytest.fixture
def tmp_data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
