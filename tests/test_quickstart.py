"""The README's quickstart and its SaaS example, run as a newcomer pastes them (issue 16).

The shell blocks after `<!-- quickstart:NAME -->` and `<!-- saas:NAME -->` in README.md run with
bash (`set -euo pipefail`) in a fresh temporary directory, with a real `openkms serve`, the real
AWS CLI, boto3 and the AWS Encryption SDK. As in the README, the server runs in a "second
terminal" (its own bash process, started in its own session and killed at the end whatever
happens), and every other block runs in order in one "first terminal" (one bash process, so that
its exports and variables carry from block to block).

Every block runs exactly as written, except for these, and only these, substitutions:

- The install block (`quickstart:install`) is not run: creating a virtual environment and
  installing openkms and the clients from PyPI would take minutes. Instead `.venv` is a symbolic
  link to the environment running this test, which has openkms and the clients installed (the
  `test` extra), and `. .venv/bin/activate` runs as the block would. The test checks that every
  package the block names is installed there.
- The port: the server listens on a free port (`OPENKMS_PORT` in the second terminal's
  environment) instead of 8080, which may be busy here, and `127.0.0.1:8080` in the blocks reads
  `127.0.0.1:<that port>`.
- The machine is fresh: HOME is an empty directory (no `~/.aws`), the test's own `AWS_*`,
  `OPENKMS_*` and `VIRTUAL_ENV` variables are removed and this environment's `bin` is not on PATH
  until the activation puts it there.

Between blocks the first terminal prints a marker line (to stdout and stderr) so that each block's
output can be checked on its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from tests.server import free_port

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ["install", "serve", "env", "aws-cli", "boto3", "esdk"]
SAAS = ["accounts", "profiles", "tenants", "key-policy", "vendor-app", "cut-off"]
CUSTOMER, VENDOR = "111122223333", "444455556666"
MARKER = "### openkms-quickstart-test block "


def readme_blocks(kind: str) -> dict[str, str]:
    """The shell blocks after `<!-- KIND:NAME -->` in the README, in order, exactly as readers see them."""
    text = (ROOT / "README.md").read_text()
    return {m.group(1): m.group(2)
            for m in re.finditer(rf"<!-- {kind}:([\w-]+) -->\s*```sh\n(.*?)```", text, re.S)}


def test_the_readme_has_the_blocks_in_order() -> None:
    assert list(readme_blocks("quickstart")) == QUICKSTART
    assert list(readme_blocks("saas")) == SAAS


def fresh_env(home: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "OPENKMS_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = ":".join(p for p in env.get("PATH", "/usr/bin:/bin").split(":")
                           if p and Path(p).resolve() != Path(venv_bin).resolve())
    env["HOME"] = str(home)
    return env


def installed_instead(block: str, workdir: Path) -> str:
    """What runs instead of the install block: `.venv` is this environment, then the activation."""
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines[0] == "python3 -m venv .venv && . .venv/bin/activate && pip install .", lines
    for line in lines[1:]:
        words = line.split()
        assert words[:2] == ["pip", "install"], line
        for requirement in words[2:]:
            name = re.split(r"[\[<>=]", requirement.strip("'\""))[0]
            try:
                distribution(name)
            except PackageNotFoundError:
                pytest.fail(f"the README's install block names {name}, which is not installed here")
    prefix = Path(sys.prefix)
    if (prefix / "bin" / "activate").exists():
        (workdir / ".venv").symlink_to(prefix)
    else:  # not a virtual environment: an activate script that does what one would
        (workdir / ".venv" / "bin").mkdir(parents=True)
        (workdir / ".venv" / "bin" / "activate").write_text(f'PATH="{Path(sys.executable).parent}:$PATH"\n')
    return ". .venv/bin/activate"


def on_port(block: str, port: int) -> str:
    return block.replace("127.0.0.1:8080", f"127.0.0.1:{port}")


def stop(proc: subprocess.Popen[str]) -> None:
    """Ends the process's whole session (bash and whatever it started), politely first."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def second_terminal(block: str, workdir: Path, env: dict[str, str], port: int) -> Iterator[Path]:
    """The serve block running in its own bash, until it says it serves; yields its output file."""
    log = workdir.parent / "second-terminal.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + block], cwd=workdir, text=True,
                                env={**env, "OPENKMS_PORT": str(port)}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while f"openkms serving on http://127.0.0.1:{port}" not in log.read_text():
            assert proc.poll() is None, f"the server's terminal ended:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no banner from the server:\n{log.read_text()}"
            time.sleep(0.1)
        yield log
    finally:
        stop(proc)


def first_terminal(blocks: list[tuple[str, str]], workdir: Path, env: dict[str, str]
                   ) -> dict[str, tuple[str, str]]:
    """Runs the blocks in order in one bash; returns each block's (stdout, stderr)."""
    script = ["set -euo pipefail"]
    for name, block in blocks:
        script += [f"echo '{MARKER}{name}'; echo '{MARKER}{name}' >&2", block]
    proc = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        stop(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the blocks did not finish in time:\n{stdout}\n{stderr}")
    finally:
        stop(proc)

    def split(text: str) -> dict[str, str]:
        parts = re.split(rf"^{re.escape(MARKER)}(\S+)\n", text, flags=re.M)
        return dict(zip(parts[1::2], parts[2::2], strict=True))

    outs, errs = split(stdout), split(stderr)
    last = list(outs)[-1] if outs else "(none)"
    assert proc.returncode == 0, f"README block {last!r} failed ({proc.returncode}):\n{stdout}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    return {name: (outs[name], errs[name]) for name, _ in blocks}


@contextlib.contextmanager
def quickstart(tmp_path: Path, more: list[tuple[str, str]]) -> Iterator[tuple[Path, dict[str, tuple[str, str]]]]:
    """The quickstart up to its AWS CLI step (all of it when `more` is empty), then `more`."""
    blocks = readme_blocks("quickstart")
    workdir, home = tmp_path / "clone", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()
    env = fresh_env(home)
    port = free_port()
    activate = installed_instead(blocks["install"], workdir)
    later = [(name, on_port(blocks[name], port)) for name in QUICKSTART[2:] if not more or name in ("env", "aws-cli")]
    with second_terminal(on_port(blocks["serve"], port), workdir, env, port) as log:
        assert "credentials: " in log.read_text()
        yield workdir, first_terminal([("install", activate), *later, *more], workdir, env)


def test_quickstart(tmp_path: Path) -> None:
    with quickstart(tmp_path, []) as (workdir, out):
        # Nothing went wrong on the way (a library's deprecation warning would not count).
        assert all("error" not in err.lower() for _, err in out.values()), out
        # The AWS CLI: a key, and the file back as it was.
        made = re.fullmatch(r"made key ([0-9a-f-]{36})\n", out["aws-cli"][0].splitlines(keepends=True)[0])
        assert made and uuid.UUID(made.group(1))
        assert (workdir / "secret.txt").read_text() == "my first secret\n"
        assert (workdir / "decrypted.txt").read_bytes() == (workdir / "secret.txt").read_bytes()
        assert b"my first secret" not in (workdir / "secret.enc").read_bytes()
        assert out["aws-cli"][0].endswith("\nmy first secret\n")
        # boto3 and the Encryption SDK round-trip their text.
        assert out["boto3"][0] == "hello from boto3\n"
        assert out["esdk"][0] == "hello from the Encryption SDK\n"
        # The credentials file is the one the server wrote, with the operator's key pair.
        assert "[default]" in (workdir / "openkms-data" / "credentials").read_text()


def test_saas_example(tmp_path: Path) -> None:
    saas = list(readme_blocks("saas").items())
    with quickstart(tmp_path, saas) as (workdir, out):
        # The operator made the two accounts and an administrator in each.
        accounts = out["accounts"][0]
        assert f'"AccountId": "{CUSTOMER}"' in accounts and f'"AccountId": "{VENDOR}"' in accounts
        assert accounts.count('"Level": "account-admin"') == 2, accounts
        # Their key pairs are profiles of the credentials file the quickstart exported.
        credentials = (workdir / "openkms-data" / "credentials").read_text()
        for profile in ("[default]", "[customer]", "[vendor]", "[vendor-app]"):
            assert profile in credentials
        assert (workdir / "openkms-data" / "credentials").stat().st_mode & 0o077 == 0
        # Each tenant made its key in its own account; the vendor was refused the customer's.
        stdout, stderr = out["tenants"]
        assert re.fullmatch(rf"arn:aws:kms:us-east-1:{VENDOR}:key/[0-9a-f-]{{36}}\nrefused\n", stdout), stdout
        assert "An error occurred (AccessDeniedException) when calling the Encrypt operation" in stderr, stderr
        assert f"arn:aws:iam::{VENDOR}:root" in stderr  # the vendor's administrator, as itself
        # Once the key policy and its identity policy allow it, the vendor's application uses the key.
        assert out["vendor-app"][0].endswith("my first secret\n"), out["vendor-app"]
        assert '"Level": "user"' in out["vendor-app"][0]
        # The customer sees the vendor's use in its audit log, and cuts it off.
        stdout, stderr = out["cut-off"]
        assert re.search(rf"^\S+\tarn:aws:iam::{VENDOR}:user/app$", stdout, re.M), stdout
        assert stdout.endswith("\nrefused\n"), stdout
        assert "An error occurred (AccessDeniedException) when calling the Decrypt operation" in stderr, stderr
