"""`openkms serve --dev`: the real command, driven with boto3, the AWS CLI and a team's own pytest suite.

Each dev server runs with TMPDIR in the test's own directory, so that a test can see exactly which
temporary store it made and that nothing of it is left after the server stops.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from openkms.client.admin import AdminClient, AdminError
from tests.server import ServerProcess, free_port
from tests.test_awscli import AWS_CLI

DEV_ACCOUNT = "000000000000"
REGION = "us-east-1"
SUITE = Path(__file__).parent / "dev_suite"


class DevServer:
    """`openkms serve --dev` in a process group of its own, its output in a file."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.args = ["--dev", "--port", str(self.port), *args]
        self.log_path = workdir / f"dev-{self.port}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OPENKMS_")}
        self.env.update(env or {}, TMPDIR=str(self.tmpdir))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> DevServer:
        self.log = open(self.log_path, "wb")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "openkms.cli.main", "serve", *self.args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"openkms exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"openkms --dev did not become healthy:\n{self.output()}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exports(self) -> dict[str, str]:
        """The variables of the banner's `export` line."""
        lines = [line for line in self.output().splitlines() if line.startswith("export ")]
        assert len(lines) == 1, self.output()
        return dict(part.split("=", 1) for part in lines[0].removeprefix("export ").split())

    def data_dir(self) -> Path:
        m = re.search(r"storage: +sqlite in (\S+) \(deleted at exit\)", self.output())
        assert m is not None, self.output()
        return Path(m.group(1))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.log.close()
        return self.proc.returncode

    def reset(self, method: str = "POST") -> tuple[int, dict[str, Any]]:
        return http(f"{self.endpoint}/_openkms/reset", method)


def http(url: str, method: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, method=method)  # no body, as `curl -X POST` sends
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def client(dev: DevServer, service: str = "kms", access_key_id: str = "test", secret: str = "test",
           region: str = REGION) -> Any:
    return boto3.client(service, endpoint_url=dev.endpoint, region_name=region, aws_access_key_id=access_key_id,
                        aws_secret_access_key=secret, config=Config(retries={"max_attempts": 1}))


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def isolated_env(tmp_path: Path, variables: dict[str, str]) -> dict[str, str]:
    """This environment without the developer's AWS or openkms settings, plus `variables`."""
    empty = tmp_path / "empty-aws-config"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPENKMS_"))}
    env.update(AWS_CONFIG_FILE=str(empty), AWS_SHARED_CREDENTIALS_FILE=str(empty), AWS_EC2_METADATA_DISABLED="true",
               AWS_PAGER="", AWS_MAX_ATTEMPTS="1")
    env.update(variables)
    return env


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    server = DevServer(tmp_path_factory.mktemp("dev")).start()
    yield server
    server.stop()


# -- the banner and the credentials ---------------------------------------------------------------


def test_banner_warns_and_names_the_account(dev: DevServer) -> None:
    out = dev.output()
    assert "NOT authenticated" in out and "temporary" in out
    assert f"account id:  {DEV_ACCOUNT}" in out
    assert "quotas:      off" in out
    assert dev.exports() == {"AWS_ENDPOINT_URL": dev.endpoint, "AWS_ACCESS_KEY_ID": "test",
                             "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}
    data_dir = dev.data_dir()
    assert data_dir.parent == dev.tmpdir and data_dir.is_dir()
    assert data_dir.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(AWS_CLI is None, reason="the AWS CLI (`aws`, awscli v1) is not installed")
def test_the_exported_lines_work_with_the_aws_cli(dev: DevServer, tmp_path: Path) -> None:
    assert AWS_CLI is not None
    env = isolated_env(tmp_path, dev.exports())  # no --endpoint-url, no credentials but the banner's

    def aws(*args: str) -> str:
        proc = subprocess.run([AWS_CLI, *args], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert aws("sts", "get-caller-identity", "--query", "Account", "--output", "text") == DEV_ACCOUNT
    key_id = aws("kms", "create-key", "--query", "KeyMetadata.KeyId", "--output", "text")
    blob = aws("kms", "encrypt", "--key-id", key_id, "--plaintext", "hello",  # AWS CLI v1: the text itself
               "--query", "CiphertextBlob", "--output", "text")
    assert client(dev).decrypt(CiphertextBlob=base64.b64decode(blob))["Plaintext"] == b"hello"


def test_the_exported_lines_work_with_boto3(dev: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in isolated_env(tmp_path, dev.exports()).items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    kms = boto3.session.Session().client("kms")  # everything from the environment, as an application does
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    assert f":{DEV_ACCOUNT}:key/" in kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]


@pytest.mark.parametrize("access_key_id", ["test", "AKIAIOSFODNN7EXAMPLE", "x", "A" * 128])
def test_any_well_formed_access_key_id_with_any_secret_is_the_administrator(dev: DevServer,
                                                                           access_key_id: str) -> None:
    identity = client(dev, "sts", access_key_id, os.urandom(8).hex()).get_caller_identity()
    assert identity["Account"] == DEV_ACCOUNT
    assert identity["Arn"] == f"arn:aws:iam::{DEV_ACCOUNT}:user/admin"
    # One account: what one id made, another uses.
    key_id = client(dev, access_key_id=access_key_id, secret="whatever").create_key()["KeyMetadata"]["KeyId"]
    blob = client(dev).encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    assert client(dev, access_key_id="other", secret="s").decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"


def test_requests_must_still_be_sigv4_for_this_region_and_service(dev: DevServer) -> None:
    status, body = http(dev.endpoint + "/", "POST")  # not signed at all
    assert status >= 400 and body["__type"] == "MissingAuthenticationTokenException"
    with pytest.raises(ClientError) as caught:
        client(dev, region="eu-west-1").list_keys()
    assert error_code(caught) == "InvalidSignatureException"
    with pytest.raises(ClientError) as caught:
        client(dev, access_key_id="not-well-formed").list_keys()
    assert error_code(caught) == "UnrecognizedClientException"


def test_access_keys_the_store_knows_are_verified(dev: DevServer) -> None:
    """A user made in dev mode keeps its own identity: its secret is checked, its policies apply."""
    admin = AdminClient(dev.endpoint, "test", "test", REGION)
    admin.call("CreateUser", AccountId=DEV_ACCOUNT, UserName="app")
    issued = admin.call("CreateAccessKey", AccountId=DEV_ACCOUNT, UserName="app")["AccessKey"]
    app_id, app_secret = issued["AccessKeyId"], issued["SecretAccessKey"]
    assert client(dev, "sts", app_id, app_secret).get_caller_identity()["Arn"].endswith(":user/app")
    with pytest.raises(ClientError) as caught:
        client(dev, access_key_id=app_id, secret=app_secret).create_key()  # no policy allows it
    assert error_code(caught) == "AccessDeniedException"
    with pytest.raises(ClientError) as caught:
        client(dev, access_key_id=app_id, secret="wrong").list_keys()
    assert error_code(caught) == "InvalidSignatureException"
    admin.call("UpdateAccessKey", AccessKeyId=app_id, Status="Inactive")
    with pytest.raises(ClientError) as caught:  # switched off: refused, not taken for the administrator
        client(dev, access_key_id=app_id, secret=app_secret).list_keys()
    assert error_code(caught) == "UnrecognizedClientException"


def test_kms_and_secrets_manager_work(dev: DevServer) -> None:
    kms, sm = client(dev), client(dev, "secretsmanager")
    key_id = kms.create_key(Description="dev")["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"secret data", EncryptionContext={"a": "b"})["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})["Plaintext"] == b"secret data"
    sm.create_secret(Name="db/password", SecretString="hunter2")
    assert sm.get_secret_value(SecretId="db/password")["SecretString"] == "hunter2"


# -- reset --------------------------------------------------------------------------------------------


def test_reset_empties_the_store_and_keeps_the_credentials(dev: DevServer) -> None:
    kms, sm = client(dev), client(dev, "secretsmanager")
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/before-reset", TargetKeyId=key_id)
    kms.create_grant(KeyId=key_id, GranteePrincipal=f"arn:aws:iam::{DEV_ACCOUNT}:user/someone",
                     Operations=["Decrypt"])
    sm.create_secret(Name="before-reset", SecretString="x")
    admin = AdminClient(dev.endpoint, "test", "test", REGION)
    admin.call("CreateAccount", Name="other", AccountId="111111111111")
    admin.call("CreateUser", AccountId=DEV_ACCOUNT, UserName="someone")
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]

    assert dev.reset() == (200, {"reset": True})

    assert kms.list_keys()["Keys"] == []
    assert not [a for a in kms.list_aliases()["Aliases"] if a["AliasName"] == "alias/before-reset"]
    assert sm.list_secrets()["SecretList"] == []
    with pytest.raises(ClientError) as caught:
        kms.describe_key(KeyId=key_id)
    assert error_code(caught) == "NotFoundException"
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=blob)
    assert error_code(caught) in ("InvalidCiphertextException", "NotFoundException")
    assert [a["AccountId"] for a in admin.call("ListAccounts")["Accounts"]] == [DEV_ACCOUNT]
    assert [u["UserName"] for u in admin.call("ListUsers", AccountId=DEV_ACCOUNT)["Users"]] == ["admin"]
    # The credentials and the account still work, and so does what comes next.
    assert client(dev, "sts").get_caller_identity()["Account"] == DEV_ACCOUNT
    new_key = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/before-reset", TargetKeyId=new_key)
    assert [k["KeyId"] for k in kms.list_keys()["Keys"]] == [new_key]
    sm.create_secret(Name="before-reset", SecretString="y")  # (it makes the aws/secretsmanager key anew)
    assert sm.get_secret_value(SecretId="before-reset")["SecretString"] == "y"
    # The reset is in the audit log, which it keeps.
    events = admin.call("QueryAuditEvents", EventName="Reset")["Events"]
    assert events and events[-1]["eventSource"] == "openkms.dev"


def test_reset_takes_only_post(dev: DevServer) -> None:
    kms = client(dev)
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    status, body = dev.reset("GET")
    assert status == 400 and body["__type"] == "UnknownOperationException"
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyId"] == key_id  # nothing was reset


def test_a_team_suite_passes_against_dev_mode_and_needs_its_reset(dev: DevServer, tmp_path: Path) -> None:
    """tests/dev_suite, a copy as in a team's own repository, with the banner's variables."""
    project = tmp_path / "project"
    shutil.copytree(SUITE, project / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    env = isolated_env(tmp_path, dev.exports())

    def pytest_run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                               "tests"], cwd=project, env=env, capture_output=True, text=True, timeout=300,
                              check=False)

    client(dev).create_key()  # left over from an earlier test: the suite's reset must clear it
    passed = pytest_run()
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "6 passed" in passed.stdout

    # The same suite without its reset fixture: leftovers and names already taken make it fail.
    conftest = project / "tests" / "conftest.py"
    conftest.write_text(conftest.read_text().replace("@pytest.fixture(autouse=True)", "@pytest.fixture"))
    client(dev).create_key()
    failed = pytest_run()
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "FAILED tests/test_app.py::test_store_starts_empty" in failed.stdout
    assert "ERROR tests/test_app.py::test_a_disabled_key_cannot_seal" in failed.stdout
    assert "AlreadyExistsException" in failed.stdout


# -- start and stop -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_temporary_store_is_deleted_at_exit(tmp_path: Path, sig: int) -> None:
    server = DevServer(tmp_path, "--dev-account-id", "123456789012").start()
    try:
        data_dir = server.data_dir()
        assert (data_dir / "openkms.db").is_file()
        assert client(server, "sts").get_caller_identity()["Account"] == "123456789012"
        client(server).create_key()
    finally:
        status = server.stop(sig)
    assert status == 0, server.output()
    assert not data_dir.exists()
    assert list(server.tmpdir.iterdir()) == []
    assert "Traceback" not in server.output()


def run_serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OPENKMS_")}
    full_env.update(env or {}, TMPDIR=str(tmpdir))
    return subprocess.run([sys.executable, "-m", "openkms.cli.main", "serve", *args], env=full_env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("args", "env", "says"), [
    (["--host", "0.0.0.0"], {}, "--dev listens only on loopback"),
    (["--host", "0.0.0.0", "--insecure-http"], {}, "drop --insecure-http"),
    (["--host", "192.0.2.1"], {}, "not 192.0.2.1"),
    ([], {"OPENKMS_HOST": "0.0.0.0"}, "not 0.0.0.0"),
    (["--data-dir", "somewhere"], {}, "drop --data-dir"),
    (["--storage-url", "postgresql://x/y"], {}, "drop --storage-url"),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem"], {}, "drop --tls-cert, --tls-key"),
    (["--root-pkcs11-module", "/usr/lib/softhsm/libsofthsm2.so"], {}, "drop --root-pkcs11-module"),
    (["--dev-account-id", "123"], {}, "bad dev-account-id '123'"),
    ([], {"OPENKMS_DEV_ACCOUNT_ID": "abc"}, "an account id is 12 digits"),
])
def test_dev_refuses_what_it_cannot_be(tmp_path: Path, args: list[str], env: dict[str, str], says: str) -> None:
    proc = run_serve(tmp_path, "--dev", "--port", str(free_port()), *args, env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("openkms: cannot start: "), proc.stderr
    assert says in proc.stderr
    assert list((tmp_path / "tmp").iterdir()) == []  # no temporary store made, or none left


def test_a_failed_dev_start_leaves_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = run_serve(tmp_path, "--dev", "--port", str(busy.getsockname()[1]))
    assert proc.returncode == 2 and "is already in use" in proc.stderr, proc.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


def test_dev_account_id_needs_dev(tmp_path: Path) -> None:
    proc = run_serve(tmp_path, "--dev-account-id", "123456789012", "--data-dir", str(tmp_path / "data"))
    assert proc.returncode == 2 and proc.stderr.strip() == "openkms: cannot start: --dev-account-id goes with --dev"


def test_serve_help_describes_dev(tmp_path: Path) -> None:
    proc = run_serve(tmp_path, "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "--dev dev mode, for laptops and test suites" in text and "NOT authenticated" in text
    assert "--dev-account-id ID" in text and "OPENKMS_DEV_ACCOUNT_ID" in text


def test_the_dev_app_serves_only_a_store_serve_dev_made(tmp_path: Path) -> None:
    from openkms.api.dev import create_app
    from openkms.config import Settings
    from openkms.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="only a data dir that `openkms serve --dev` made"):
        create_app(Settings(data_dir=tmp_path / "data"))


# -- a normal server has none of it ---------------------------------------------------------------------


def test_a_normal_server_refuses_test_credentials_and_has_no_reset(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data")
    server.start()
    try:
        kms = server.client()
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]
        for access_key_id in ("test", "AKIAIOSFODNN7EXAMPLE"):
            with pytest.raises(ClientError) as caught:
                server.client(access_key_id, "test").list_keys()
            assert error_code(caught) == "UnrecognizedClientException"
        status, body = http(f"{server.endpoint}/_openkms/reset", "POST")
        assert status == 400 and body["__type"] == "UnknownOperationException"
        assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyId"] == key_id
        with pytest.raises(AdminError) as refused:
            AdminClient(server.endpoint, "test", "test", REGION).call("ListAccounts")
        assert refused.value.code == "UnrecognizedClientException"
    finally:
        server.stop()
