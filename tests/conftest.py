"""Shared fixtures: real `openkms serve` processes on loopback ports, driven by boto3.

The `server` fixture is parametrized over the two stores: SQLite (embedded) and PostgreSQL.
PostgreSQL tests read the DSN of a server they may create databases on from
OPENKMS_TEST_POSTGRES_DSN (e.g. postgresql://postgres@127.0.0.1:5432/test); without it they are
skipped with a message. CI sets it, and fails if the database cannot be reached.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from hypothesis import settings as hypothesis_settings

from tests.server import ServerProcess

PG_ENV = "OPENKMS_TEST_POSTGRES_DSN"
ACCOUNT_ID = "111122223333"

# The suite makes keys, grants and aliases far faster than AWS's request quotas allow (CreateKey:
# 5 a second per account); its servers run without quotas unless a test asks for them, as
# tests/test_quotas.py does. Benchmarks keep the shipping default (quotas on).
ServerProcess.defaults["OPENKMS_QUOTAS"] = "off"

# Hypothesis' per-example deadline is a timing assertion: on a small, busy machine (a CI run beside
# other work) an example that takes 260 ms instead of 200 ms failed a property test that holds.
hypothesis_settings.register_profile("openkms", deadline=None)
hypothesis_settings.load_profile("openkms")
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


# -- SoftHSM2: PKCS#11 tokens for the HSM key store tests ------------------------------------------
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass
class SoftHsm:
    """A SoftHSM2 token directory of this test session (SOFTHSM2_CONF points every server at it)."""

    conf: Path
    tokens: Path
    module: str = SOFTHSM_MODULE

    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def init_token(self, pin: str = "kmsuser-pin", so_pin: str = "so-pin-1234") -> str:
        """A new token with a unique label; returns the label."""
        label = "t" + secrets.token_hex(6)
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", so_pin,
                        "--pin", pin], env={**os.environ, **self.env()}, check=True, capture_output=True)
        return label

    def tool(self, label: str, pin: str, *args: str) -> subprocess.CompletedProcess[str]:
        """pkcs11-tool (OpenSC) on a token, from outside the server."""
        return subprocess.run(["pkcs11-tool", "--module", self.module, "--token-label", label, "--login",
                               "--pin", pin, *args], env={**os.environ, **self.env()}, capture_output=True,
                              text=True, check=False)


def softhsm_available() -> bool:
    return shutil.which("softhsm2-util") is not None and Path(SOFTHSM_MODULE).exists() and \
        shutil.which("pkcs11-tool") is not None


_SESSION_HSM: list[SoftHsm] = []


def pytest_configure(config: pytest.Config) -> None:
    """One SoftHSM2 token directory for the session, set before any server starts (each inherits
    SOFTHSM2_CONF); tests make tokens in it with labels of their own."""
    if not softhsm_available():
        return
    root = Path(tempfile.mkdtemp(prefix="openkms-softhsm-"))
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    _SESSION_HSM.append(SoftHsm(conf, root / "tokens"))


@pytest.fixture(scope="session")
def softhsm() -> SoftHsm:
    """SoftHSM2 and OpenSC's pkcs11-tool; skipped without them, except in CI (OPENKMS_REQUIRE_HSM)."""
    if not _SESSION_HSM:
        if os.environ.get("OPENKMS_REQUIRE_HSM"):
            pytest.fail("OPENKMS_REQUIRE_HSM is set but softhsm2 / pkcs11-tool are not installed")
        pytest.skip("HSM tests need SoftHSM2 and OpenSC (Debian packages softhsm2, opensc)")
    return _SESSION_HSM[0]


def trust_anchor(tmp_path: Path) -> str:
    """A customer CA certificate (PEM), made with openssl as a customer would."""
    key, cert = tmp_path / "ca.key", tmp_path / "customerCA.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "30", "-subj", "/CN=customer CA"],
                   check=True, capture_output=True)
    return cert.read_text()
