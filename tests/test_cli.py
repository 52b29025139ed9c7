"""The `openkms` command as a user meets it: the real command in a subprocess (`python -m openkms`)
against a real server, with the environment a user has exported.

No failure ends in a traceback: a bad argument, setting, file or endpoint, a missing profile or an
unreachable server is one line on stderr and exit status 2; an error the server answers is the AWS
CLI's line ("An error occurred (Code) when calling the Op operation: ...") and the AWS CLI v2's
status, 254. The AWS CLI's variables, precedence, common options (before or after the
subcommand), --output, --query and file:// are honoured.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openkms.cli.main import ADMIN_COMMANDS, ENVIRONMENT_SETTINGS, build_parser, main
from openkms.config import Settings
from tests.conftest import bootstrap_env
from tests.server import ServerProcess, free_port

REGION = "us-east-1"


def clean_env(**extra: str) -> dict[str, str]:
    """No AWS_* or OPENKMS_* from the test runner, and a HOME without ~/.aws."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPENKMS_"))}
    env["HOME"] = extra.pop("HOME", "/nonexistent")
    env.update(extra)
    return env


def openkms(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "openkms", *args], env=env or clean_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_line_failure(proc: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The failure was one line on stderr, nothing on stdout, no traceback, the given status."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == status, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    assert proc.stdout == "", proc.stdout
    return lines[0]


def write_credentials(path: Path, access_key_id: str, secret: str, profile: str = "default") -> Path:
    with path.open("a") as f:
        f.write(f"[{profile}]\naws_access_key_id = {access_key_id}\naws_secret_access_key = {secret}\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server on SQLite: what is tested here is the command, not the store."""
    proc = ServerProcess(tmp_path_factory.mktemp("openkms-data"), env=bootstrap_env())
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def ops_credentials(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A credentials file without [default]: only its profile [ops] holds the administrator's key."""
    return write_credentials(tmp_path_factory.mktemp("aws") / "credentials", server.access_key_id,
                             server.secret_access_key, profile="ops")


def flags(server: ServerProcess) -> list[str]:
    return ["--endpoint-url", server.endpoint, "--credentials-file", str(server.data_dir / "credentials")]


def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


# -- help and version ------------------------------------------------------------------------------


def test_openkms_alone_prints_help_and_version_prints_version() -> None:
    alone = openkms()
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    assert alone.stdout.startswith("usage: openkms") and "serve" in alone.stdout and "admin" in alone.stdout
    assert "arguments are required" not in alone.stdout + alone.stderr
    shown = openkms("--version")
    assert shown.returncode == 0 and shown.stdout == f"openkms {version('openkms')}\n", shown
    admin_alone = openkms("admin")
    assert admin_alone.returncode == 2 and "create-account" in admin_alone.stdout


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_every_admin_command_has_a_description_and_an_example() -> None:
    commands = subcommands(subcommands(build_parser())["admin"])
    assert set(commands) == set(ADMIN_COMMANDS)
    for name, command in commands.items():
        text = command.format_help()
        assert ADMIN_COMMANDS[name].description.split(".")[0] in text, name
        assert f"example:\n  openkms admin {name}" in text, name
    # And the real command shows them.
    shown = openkms("admin", "create-user", "--help")
    assert shown.returncode == 0 and "example:" in shown.stdout and "--admin" in shown.stdout


def test_serve_help_lists_the_settings_without_a_flag() -> None:
    serve = subcommands(build_parser())["serve"]
    with_flag = {action.dest for action in serve._actions}
    only_env = [f.name for f in fields(Settings) if f.name not in with_flag]
    assert "root_passphrase" in only_env and "host" not in only_env
    assert not set(only_env) - set(ENVIRONMENT_SETTINGS), "describe it in ENVIRONMENT_SETTINGS"
    shown = openkms("serve", "--help").stdout
    for name in only_env:
        assert re.search(rf"^  OPENKMS_{name.upper()} +\S", shown, re.M), name
    assert "OPENKMS_BOOTSTRAP_ACCOUNT_ID" in shown


def test_completion_scripts_for_bash_and_zsh(tmp_path: Path) -> None:
    for shell in ("bash", "zsh"):
        proc = openkms("completion", shell)
        assert proc.returncode == 0 and "openkms" in proc.stdout and "_ARGCOMPLETE" in proc.stdout, proc.stderr
    # The completion protocol itself: argcomplete asks the command for the words after `openkms adm`.
    answer = tmp_path / "completions"
    env = clean_env(_ARGCOMPLETE="1", _ARGCOMPLETE_SHELL="bash", COMP_LINE="openkms admin list-acc",
                    COMP_POINT=str(len("openkms admin list-acc")), _ARGCOMPLETE_IFS="\n",
                    _ARGCOMPLETE_STDOUT_FILENAME=str(answer))
    proc = subprocess.run([sys.executable, "-m", "openkms"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(answer.read_text().split()) == ["list-access-keys", "list-accounts"]


# -- no traceback: one line, exit 2 ----------------------------------------------------------------------


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    creds = write_credentials(tmp_path / "creds", "AKIA" + "A" * 16, "x" * 40)
    dead = dead_endpoint()
    common = ["--endpoint-url", dead, "--credentials-file", str(creds)]
    policy = ["put-user-policy", "--account-id", "111122223333", "--user-name", "u", "--policy-name", "p"]
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["admin", "list-accounts", "--bogus"], {}, "unrecognized arguments: --bogus"),
        (["admin", "create-user", "--account-id", "1"], {}, "--user-name"),
        (["nonsense"], {}, "invalid choice"),
        (["admin", *common, *policy, "--policy-document", f"file://{tmp_path}/missing.json"], {},
         "missing.json: no such file"),
        (["admin", *common, *policy, "--policy-document", f"file://{tmp_path}/bad.json"], {}, "not a JSON document"),
        (["admin", *common, *policy, "--policy-document", "{inline"], {}, "not a JSON document"),
        (["admin", *common, "list-accounts", "--query", "Accounts[?"], {}, "bad JMESPath expression"),
        (["audit", "query", *common, "--since", "yesterday"], {}, "'yesterday' is not a time"),
        (["admin", "--endpoint-url", "127.0.0.1:8080", "--credentials-file", str(creds), "list-accounts"], {},
         "give a URL with its scheme"),
        (["admin", "list-accounts"], {"OPENKMS_ENDPOINT_URL": "localhost", "AWS_SHARED_CREDENTIALS_FILE": str(creds)},
         "give a URL with its scheme"),
        (["admin", *common, "list-accounts"], {}, f"cannot reach the server at {dead}/"),
        (["audit", "tail", "-f", *common], {}, "is `openkms serve` running there?"),
        (["admin", "--credentials-file", str(tmp_path / "nothing"), "list-accounts"], {}, "no credentials file"),
        (["admin", "list-accounts"], {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_PROFILE": "ops"},
         "has no profile [ops]"),
        (["admin", "list-accounts"], {}, "no credentials file"),  # no ./openkms-data, no ~/.aws
        (["admin", "--endpoint-url", "https://127.0.0.1:1", "--ca-bundle", str(tmp_path / "ca.pem"),
          "--credentials-file", str(creds), "list-accounts"], {}, "no CA bundle at"),
        (["admin", *common, "list-accounts"], {"AWS_DEFAULT_OUTPUT": "yaml"}, "bad output format 'yaml'"),
        (["byok", "wrap", "--public-key", f"fileb://{tmp_path}/none.der", "--algorithm", "RSAES_OAEP_SHA_256",
          "--material", "k", "--out", "w"], {}, "no public key file at"),
        (["audit", "verify", "--data-dir", str(tmp_path / "no-store")], {}, "no store at"),
        (["serve", "--data-dir", str(tmp_path / "d")], {"OPENKMS_PORT": "eighty"}, "bad port 'eighty'"),
        (["serve", "--data-dir", str(tmp_path / "d")], {"OPENKMS_XKS_TIMEOUT_MS": "5"}, "bad xks-timeout-ms"),
        (["serve", "--data-dir", str(tmp_path / "d")], {"OPENKMS_HSM_RATE_LIMIT": "0"}, "bad hsm-rate-limit"),
    ]
    for argv, env, expected in cases:
        line = one_line_failure(openkms(*argv, env=clean_env(**env), cwd=tmp_path))
        assert expected in line, (argv, line)


def test_server_error_is_printed_as_the_aws_cli_does(server: ServerProcess) -> None:
    proc = openkms("admin", *flags(server), "create-account", "--name", "x", "--account-id", "12345")
    line = one_line_failure(proc, status=254)
    assert line.startswith("An error occurred (ValidationException) when calling the CreateAccount operation: "), line


# -- the AWS CLI's environment, precedence and options -------------------------------------------------


def list_account_ids(proc: subprocess.CompletedProcess[str]) -> set[str]:
    assert proc.returncode == 0, proc.stderr
    return {a["AccountId"] for a in json.loads(proc.stdout)["Accounts"]}


def test_aws_variables_are_honoured(server: ServerProcess, ops_credentials: Path) -> None:
    from tests.conftest import ACCOUNT_ID

    env = clean_env(AWS_SHARED_CREDENTIALS_FILE=str(ops_credentials), AWS_PROFILE="ops",
                    AWS_ENDPOINT_URL=server.endpoint)
    assert ACCOUNT_ID in list_account_ids(openkms("admin", "list-accounts", env=env))
    # OPENKMS_ENDPOINT_URL is more specific than AWS_ENDPOINT_URL; --endpoint-url beats both.
    dead = dead_endpoint()
    env_dead = {**env, "AWS_ENDPOINT_URL": dead}
    assert dead in one_line_failure(openkms("admin", "list-accounts", env=env_dead))
    assert ACCOUNT_ID in list_account_ids(openkms("admin", "list-accounts",
                                                  env={**env_dead, "OPENKMS_ENDPOINT_URL": server.endpoint}))
    assert ACCOUNT_ID in list_account_ids(openkms("admin", "list-accounts", "--endpoint-url", server.endpoint,
                                                  env={**env_dead, "OPENKMS_ENDPOINT_URL": dead}))
    # --profile beats AWS_PROFILE.
    assert "[nope]" in one_line_failure(openkms("admin", "list-accounts", "--profile", "nope", env=env))

    # Keys in the environment beat the file's profile named by AWS_PROFILE (as in the AWS CLI)...
    wrong = {**env, "AWS_ACCESS_KEY_ID": server.access_key_id, "AWS_SECRET_ACCESS_KEY": "x" * 40}
    assert "(InvalidSignatureException)" in one_line_failure(openkms("admin", "list-accounts", env=wrong), 254)
    # ...but not an explicit --profile.
    assert ACCOUNT_ID in list_account_ids(openkms("admin", "list-accounts", "--profile", "ops", env=wrong))
    # The keys alone, without any file.
    keys = clean_env(AWS_ACCESS_KEY_ID=server.access_key_id, AWS_SECRET_ACCESS_KEY=server.secret_access_key,
                     OPENKMS_ENDPOINT_URL=server.endpoint)
    assert ACCOUNT_ID in list_account_ids(openkms("admin", "list-accounts", env=keys))


def test_region_comes_from_the_option_then_the_environment(server: ServerProcess, ops_credentials: Path) -> None:
    env = clean_env(AWS_SHARED_CREDENTIALS_FILE=str(ops_credentials), AWS_PROFILE="ops",
                    OPENKMS_ENDPOINT_URL=server.endpoint, AWS_REGION="eu-west-1")
    # The server signs in us-east-1 only: a request signed for another region is refused.
    assert "Exception)" in one_line_failure(openkms("admin", "list-accounts", env=env), 254)
    assert list_account_ids(openkms("admin", "list-accounts", "--region", REGION, env=env))


def test_data_dir_credentials_are_the_default(server: ServerProcess) -> None:
    """What `openkms serve` wrote is used without any option, as the README's first steps do."""
    env = clean_env(OPENKMS_DATA_DIR=str(server.data_dir), OPENKMS_ENDPOINT_URL=server.endpoint)
    assert list_account_ids(openkms("admin", "list-accounts", env=env))


def test_common_options_before_or_after_the_subcommand(server: ServerProcess, ops_credentials: Path) -> None:
    opts = ["--endpoint-url", server.endpoint, "--credentials-file", str(ops_credentials), "--profile", "ops",
            "--output", "text", "--query", "Accounts[].AccountId"]
    before = openkms("admin", *opts, "list-accounts")
    after = openkms("admin", "list-accounts", *opts)
    mixed = openkms("admin", *opts[:4], "list-accounts", *opts[4:])
    assert before.returncode == 0, before.stderr
    assert before.stdout == after.stdout == mixed.stdout and re.fullmatch(r"(\d{12}\s*)+", before.stdout)
    # Given twice, the one after the subcommand wins, as the later option does.
    assert openkms("admin", "--profile", "nope", *opts, "list-accounts").stdout == before.stdout

    # audit takes them in both places too.
    until = str(time.time())
    args = ["--event-name", "ListAccounts", "--until", until, "--query", "requestID", "--output", "text"]
    audit_before = openkms("audit", *opts[:6], "query", *args)
    audit_after = openkms("audit", "query", *opts[:6], *args)
    assert audit_before.returncode == 0, audit_before.stderr
    assert audit_before.stdout == audit_after.stdout and len(audit_before.stdout.splitlines()) >= 3


def test_output_formats_and_query(server: ServerProcess) -> None:
    name = f"fmt-{secrets.token_hex(3)}"
    account_id = openkms("admin", *flags(server), "create-account", "--name", name, "--query", "Account.AccountId",
                         "--output", "text").stdout.strip()
    assert re.fullmatch(r"\d{12}", account_id)
    listed = openkms("admin", *flags(server), "list-accounts")
    assert listed.returncode == 0
    accounts = json.loads(listed.stdout)["Accounts"]
    created = next(a for a in accounts if a["AccountId"] == account_id)

    text = openkms("admin", *flags(server), "list-accounts", "--output", "text").stdout
    assert f"ACCOUNTS\t{account_id}\t{created['CreationDate']}\t{name}\n" in text  # keys in order, as aws does
    table = openkms("admin", *flags(server), "list-accounts", "--output", "table").stdout
    assert "ListAccounts" in table and re.search(rf"\|\s+{account_id}\s+\|\s+\S+\s+\|\s+{name}\s+\|", table), table
    assert re.search(r"\|\s+AccountId\s+\|\s+CreationDate\s+\|\s+Name\s+\|", table), table
    query = openkms("admin", *flags(server), "list-accounts", "--query", f"Accounts[?Name=='{name}'].AccountId")
    assert json.loads(query.stdout) == [account_id]
    env = clean_env(AWS_DEFAULT_OUTPUT="text")
    assert openkms("admin", *flags(server), "get-user", "--query", "User.Level", env=env).stdout == "operator\n"


def test_file_and_fileb_arguments(server: ServerProcess, tmp_path: Path) -> None:
    account_id = json.loads(openkms("admin", *flags(server), "create-account", "--name", "files").stdout)[
        "Account"]["AccountId"]
    user = openkms("admin", *flags(server), "create-user", "--account-id", account_id, "--user-name", "app")
    assert user.returncode == 0, user.stderr
    document = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*"}]}
    (tmp_path / "policy.json").write_text(json.dumps(document, indent=2))
    for url, policy_name in ((f"file://{tmp_path}/policy.json", "from-file"),
                             (f"fileb://{tmp_path}/policy.json", "from-fileb")):
        put = openkms("admin", *flags(server), "put-user-policy", "--account-id", account_id, "--user-name", "app",
                      "--policy-name", policy_name, "--policy-document", url)
        assert put.returncode == 0, put.stderr
        got = openkms("admin", *flags(server), "get-user-policy", "--account-id", account_id, "--user-name", "app",
                      "--policy-name", policy_name, "--query", "PolicyDocument", "--output", "text")
        assert json.loads(got.stdout) == document, got.stdout
    # Any string option takes file:// (the AWS CLI's rule), the account id here.
    (tmp_path / "account").write_text(account_id)
    users = openkms("admin", *flags(server), "list-users", "--account-id", f"file://{tmp_path}/account",
                    "--query", "Users[].UserName", "--output", "text")
    assert users.stdout.split() == ["app"], users.stderr


# -- audit ---------------------------------------------------------------------------------------------


def test_tail_does_not_print_its_own_polling(server: ServerProcess) -> None:
    marker = openkms("audit", "query", *flags(server), "--limit", "1")  # an audit query of another command
    assert marker.returncode == 0, marker.stderr
    time.sleep(1.5)

    def tail(*extra: str) -> list[dict[str, Any]]:
        proc = subprocess.Popen([sys.executable, "-m", "openkms", "audit", "tail", "-f", "--interval", "0.2",
                                 "--window", "30", "--event-name", "QueryAuditEvents", *flags(server), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
        time.sleep(4.0)  # a dozen polls, whose records are written within the writer's batch delay
        proc.terminate()
        out, err = proc.communicate(timeout=10)
        assert "Traceback" not in err, err
        return [json.loads(line) for line in out.splitlines()]

    quiet = tail()
    assert quiet, "the other command's QueryAuditEvents record should be printed"
    assert not [e for e in quiet if "audit-tail/" in e["userAgent"]], "tail printed its own polling"
    assert any(e["userAgent"].startswith("openkms-cli/") for e in quiet)
    own = tail("--include-own-polls")
    agents = {e["userAgent"] for e in own if "audit-tail/" in e["userAgent"]}
    assert agents, "its own polls are audited, and shown with --include-own-polls"


def test_export_ends_with_a_summary(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    proc = openkms("audit", "export", *flags(server), "--event-name", "CreateAccount", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    count = len(out.read_text().splitlines())
    assert count >= 1 and proc.stderr == f"wrote {count} record{'s' * (count != 1)} to {out}\n"
    empty = tmp_path / "empty.jsonl"
    proc = openkms("audit", "export", *flags(server), "--since", "2099-01-01", "--out", str(empty))
    assert proc.returncode == 0 and proc.stderr == f"wrote 0 records to {empty}\n" and empty.read_text() == ""


def on_a_terminal(*args: str, timeout: float = 60) -> tuple[int, bytes]:
    """Run `openkms ARGS` with stdout and stderr on a pseudo-terminal: (exit status, what it showed)."""
    import os
    import pty
    import select

    leader, follower = pty.openpty()
    env = dict(clean_env(), TERM="xterm-256color", COLUMNS="100")
    proc = subprocess.Popen([sys.executable, "-m", "openkms", *args], stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=follower, env=env)
    os.close(follower)
    shown = b""
    while True:
        ready, _, _ = select.select([leader], [], [], timeout)
        if not ready:
            proc.kill()
            raise AssertionError(f"no output for {timeout} s: {shown[-300:]!r}")
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the command is done
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return proc.wait(timeout=timeout), shown


def test_long_work_shows_progress_on_a_terminal_only(server: ServerProcess, tmp_path: Path) -> None:
    """On a terminal, export shows what it is doing (rich's spinner on stderr) before its summary;
    in a pipe (the test above) there is the summary line alone."""
    out = tmp_path / "all.jsonl"
    status, shown = on_a_terminal("audit", "export", *flags(server), "--out", str(out))
    assert status == 0, shown[-500:]
    assert b"exporting audit records" in shown, shown[-500:]
    assert f"to {out}".encode() in shown and b"Traceback" not in shown
    piped = openkms("audit", "export", *flags(server), "--out", str(tmp_path / "piped.jsonl"))
    assert "exporting audit records" not in piped.stderr + piped.stdout


def test_verify_says_which_public_key_it_trusted(server: ServerProcess, tmp_path: Path) -> None:
    pem = openkms("audit", "public-key", *flags(server)).stdout
    key = serialization.load_pem_public_key(pem.encode())
    digest = hashes.Hash(hashes.SHA256())
    digest.update(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    fingerprint = digest.finalize().hex()

    from_store = openkms("audit", "verify", "--data-dir", str(server.data_dir))
    assert from_store.returncode == 0, from_store.stdout + from_store.stderr
    assert from_store.stdout.splitlines()[0].endswith(": OK")
    assert f"public key: the one in the store (SHA-256 {fingerprint}); " in from_store.stdout
    assert "--public-key" in from_store.stdout
    (tmp_path / "audit.pem").write_text(pem)
    kept_apart = openkms("audit", "verify", "--data-dir", str(server.data_dir), "--public-key",
                         str(tmp_path / "audit.pem"), "--digest-dir", str(tmp_path / "none"))
    assert kept_apart.returncode == 0, kept_apart.stdout + kept_apart.stderr
    assert f"public key: {tmp_path / 'audit.pem'} (SHA-256 {fingerprint})" in kept_apart.stdout
    assert "no exported digest copies" in kept_apart.stderr


# -- no argv at all gives a traceback ----------------------------------------------------------------------

WORDS = ["admin", "audit", "byok", "completion", "list-accounts", "create-account", "put-user-policy", "query",
         "export", "tail", "verify", "public-key", "wrap", "bash", "--name", "--account-id", "--policy-document",
         "--since", "--until", "--limit", "--query", "--output", "text", "table", "json", "--profile",
         "--endpoint-url", "--credentials-file", "--region", "--ca-bundle", "-f", "--out", "--public-key",
         "--algorithm", "RSAES_OAEP_SHA_256", "file://", "fileb://nope", "file:///etc/hostname", "http://",
         "https://127.0.0.1:1", "--help", "--version", "-", "--", "", "Accounts[", "2026-13-45", "[]", "{}", "\x00"]


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """In-process runs: nothing to reach (port 1), no store, a credentials file of no server."""
    where = tmp_path_factory.mktemp("offline")
    creds = write_credentials(where / "credentials", "AKIA" + "B" * 16, "y" * 40)
    saved = dict(os.environ)
    os.environ.update(OPENKMS_ENDPOINT_URL="http://127.0.0.1:1", AWS_SHARED_CREDENTIALS_FILE=str(creds),
                      OPENKMS_DATA_DIR=str(where / "no-data"), HOME=str(where))
    try:
        yield where
    finally:
        os.environ.clear()
        os.environ.update(saved)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=8)), max_size=7))
def test_random_argv_never_raises(offline_env: Path, argv: list[str]) -> None:
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout), contextlib.chdir(offline_env):
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            status = exc.code if isinstance(exc.code, int) else 2
    assert status in (0, 1, 2, 254), (argv, status, stderr.getvalue())
    if status:
        assert stderr.getvalue().strip() or stdout.getvalue().strip(), argv
    assert "Traceback" not in stderr.getvalue()
