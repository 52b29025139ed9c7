"""Rotation functions: what a secret's RotationLambdaARN names on this server.

AWS Secrets Manager rotates a secret by invoking a Lambda function four times, once per step
(createSecret, setSecret, testSecret, finishSecret), with `{"Step", "SecretId",
"ClientRequestToken", "RotationToken"}`; the function does its work through the public API. Here
an account administrator registers a *rotation function* under a Lambda-shaped ARN,
`arn:aws:lambda:<region>:<account>:function:<name>`, of one of these kinds:

- `webhook`: an HTTPS endpoint the customer runs. Each step is a POST of that JSON payload, signed
  so that the receiver can tell it came from this server: header `X-OpenKMS-Signature:
  t=<unix time>,v1=<hex HMAC-SHA256(signing secret, "<t>." + body)>`. The signing secret is made at
  registration, shown once, and kept sealed under the root key. A 2xx answer is success.
  `http://` only where the operator allows it (OPENKMS_ROTATION_ALLOW_HTTP), and the receiver's
  certificate is checked against OPENKMS_ROTATION_CA_BUNDLE (or the system's CAs).
- `command`: a program on the server's machine, given the payload on stdin, with AWS_ENDPOINT_URL
  and AWS_REGION set and the variables given at registration (sealed at rest: they may hold
  credentials); exit status 0 is success. It runs as the server's user, so only an operator may
  register one.
- built in, run inside the server as the account (through Secrets Manager, so that key policies
  see kms:ViaService): `random-password` (the value's `password` member, or the whole value when it
  is not a JSON object, becomes a new random password), `postgresql-single-user` and
  `postgresql-alternating-users` (AWS's two strategies for a database user's password).

Nothing here ever shows the signing secret or the variables again (views and reprs leave them out).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import re
import secrets as random
import socket
import ssl
import string
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..crypto.root import RootKey
from ..errors import (
    AlreadyExistsException,
    InvalidCiphertextException,
    KMSInternalException,
    NotFoundException,
    ValidationException,
)
from ..model import SecretStr
from ..storage import Store

log = logging.getLogger("openkms.secrets.rotation")

FUNCTION_ARN_RE = re.compile(r"^arn:aws:lambda:([a-z0-9-]+):(\d{12}):function:([A-Za-z0-9_-]{1,64})$")
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
BUILT_IN = ("random-password", "postgresql-single-user", "postgresql-alternating-users")
POSTGRESQL = ("postgresql-single-user", "postgresql-alternating-users")
KINDS = ("webhook", "command", *BUILT_IN)
# What runs on, or connects from, the server's machine: registered by an operator only.
OPERATOR_KINDS = ("command", *POSTGRESQL)
HOST_RE = re.compile(r"^[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?$")
SIGNATURE_HEADER = "X-OpenKMS-Signature"
MAX_TIMEOUT_S = 900  # a Lambda function's longest run


class StepFailed(Exception):
    """A rotation step that did not succeed; the message says why (never a secret value)."""


@dataclass(frozen=True)
class RotationFunction:
    account_id: str
    name: str
    kind: str
    created: datetime
    url: str | None = None
    command: tuple[str, ...] = ()
    timeout_s: int = 30
    password_length: int = 32
    exclude_characters: str = ""
    allowed_hosts: tuple[str, ...] = ()  # PostgreSQL: the host:port the secret's value may name
    master_secret_arn: str | None = None  # alternating users: the secret of the user who changes them
    signing_secret: SecretStr | None = field(default=None, repr=False)
    environment: tuple[tuple[str, SecretStr], ...] = field(default=(), repr=False)

    def allows_host(self, host: str, port: int) -> bool:
        return f"{host.lower()}:{port}" in self.allowed_hosts

    def arn(self, region: str) -> str:
        return f"arn:aws:lambda:{region}:{self.account_id}:function:{self.name}"

    def view(self, region: str) -> dict[str, Any]:
        out: dict[str, Any] = {"FunctionName": self.name, "FunctionArn": self.arn(region), "Kind": self.kind,
                               "AccountId": self.account_id, "TimeoutSeconds": self.timeout_s,
                               "CreationDate": self.created.timestamp()}
        if self.url:
            out["Url"] = self.url
        if self.command:
            out["Command"] = list(self.command)
        if self.environment:
            out["EnvironmentVariables"] = sorted(k for k, _ in self.environment)  # names only
        if self.allowed_hosts:
            out["AllowedHosts"] = list(self.allowed_hosts)
        if self.master_secret_arn:
            out["MasterSecretArn"] = self.master_secret_arn
        if self.kind in BUILT_IN:
            out["PasswordLength"] = self.password_length
            if self.exclude_characters:
                out["ExcludeCharacters"] = self.exclude_characters
        return out


def _aad(account_id: str, name: str, kind: str, config: str) -> bytes:
    """The sealed part is bound to its function's whole row: a kind or a command changed in the
    store (into something that runs as the server) makes the function refuse to load."""
    return b"\x00".join((b"openkms rotation function", account_id.encode(), name.encode(), kind.encode(),
                         config.encode()))


class RotationFunctions:
    """The registry (the store's rotation_functions table; the secret parts sealed under the root key)."""

    def __init__(self, store: Store, root: RootKey, region: str, allow_http: bool = False) -> None:
        self.store = store
        self.root = root
        self.region = region
        self.allow_http = allow_http

    def create(self, account_id: str, name: str, kind: str, params: dict[str, Any],
               now: datetime) -> tuple[RotationFunction, str | None]:
        """Register a function; (it, the webhook's signing secret, shown this once)."""
        if not NAME_RE.match(name):
            raise ValidationException("FunctionName must be 1-64 characters of letters, digits, '-' and '_'.")
        if kind not in KINDS:
            raise ValidationException(f"Kind must be one of {', '.join(KINDS)}.")
        timeout = int(params["TimeoutSeconds"]) if params.get("TimeoutSeconds") is not None else 30
        if not 1 <= timeout <= MAX_TIMEOUT_S:
            raise ValidationException(f"TimeoutSeconds must be from 1 to {MAX_TIMEOUT_S}.")
        length = int(params["PasswordLength"]) if params.get("PasswordLength") is not None else 32
        if not 8 <= length <= 4096:
            raise ValidationException("PasswordLength must be from 8 to 4096.")
        exclude = str(params.get("ExcludeCharacters") or "")
        if kind not in BUILT_IN and (params.get("PasswordLength") is not None or exclude):
            raise ValidationException("PasswordLength and ExcludeCharacters are for the built-in functions only.")
        if not set(string.ascii_letters + string.digits + string.punctuation) - set(exclude):
            raise ValidationException("ExcludeCharacters leaves no character to make a password of.")
        url = params.get("Url")
        command = params.get("Command")
        environment = params.get("Environment") or {}
        if kind == "webhook":
            url = self._check_url(url)
        elif url is not None:
            raise ValidationException("Url is for webhook functions only.")
        if kind == "command":
            if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
                raise ValidationException("Command must be a list of strings: the program, then its arguments.")
            if "\x00" in "".join(command) or not os.path.isabs(command[0]) or not os.access(command[0], os.X_OK):
                raise ValidationException(f"Command's program {command[0]!r} must be an absolute path to an "
                                          "executable file on the server's machine.")
        elif command is not None:
            raise ValidationException("Command is for command functions only.")
        if not isinstance(environment, dict) or not all(
                isinstance(k, str) and ENV_NAME_RE.match(k) and isinstance(v, str) for k, v in environment.items()):
            raise ValidationException("Environment must map variable names to string values.")
        if environment and kind != "command":
            raise ValidationException("Environment is for command functions only.")
        hosts, master = self._check_postgresql(kind, params)
        signing = random.token_urlsafe(32) if kind == "webhook" else None
        secret_parts = json.dumps({"signing_secret": signing, "environment": environment}).encode()
        config = json.dumps({"url": url, "command": command, "timeout_s": timeout, "password_length": length,
                             "exclude_characters": exclude, "allowed_hosts": hosts, "master_secret_arn": master})
        with self.store.begin() as tx:
            if tx.rotation_functions.get(account_id, name) is not None:
                raise AlreadyExistsException(f"A rotation function named {name} already exists in account "
                                             f"{account_id}.")
            tx.rotation_functions.insert(account_id, name, kind, config,
                                         self.root.seal(secret_parts, _aad(account_id, name, kind, config)),
                                         now.timestamp())
        made = self.get(account_id, name)
        assert made is not None
        return made, signing

    @staticmethod
    def _check_postgresql(kind: str, params: dict[str, Any]) -> tuple[list[str], str | None]:
        hosts, master = params.get("AllowedHosts"), params.get("MasterSecretArn")
        if kind not in POSTGRESQL:
            if hosts is not None or master is not None:
                raise ValidationException("AllowedHosts and MasterSecretArn are for the PostgreSQL functions only.")
            return [], None
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and HOST_RE.match(h) for h in hosts):
            raise ValidationException("A PostgreSQL function needs AllowedHosts: the host:port of each database "
                                      "its secrets may name (the port is 5432 if left out).")
        checked = sorted({(h if re.search(r":[0-9]+$", h) and not h.endswith("]") else f"{h}:5432").lower()
                          for h in hosts})
        if kind == "postgresql-alternating-users":
            if not isinstance(master, str) or not master.startswith("arn:aws:secretsmanager:"):
                raise ValidationException("An alternating-users function needs MasterSecretArn: the ARN of the "
                                          "secret of a user who may create roles and change passwords.")
        elif master is not None:
            raise ValidationException("MasterSecretArn is for the alternating-users function only.")
        return checked, master

    def _check_url(self, url: Any) -> str:
        if not isinstance(url, str) or not url:
            raise ValidationException("A webhook function needs a Url.")
        try:
            parts = urllib.parse.urlsplit(url)
            hostname, _ = parts.hostname, parts.port
        except ValueError:
            raise ValidationException("Url is not a URL.") from None
        if parts.scheme not in ("https", "http") or not hostname:
            raise ValidationException("Url must be an https:// URL with a host.")
        if parts.username is not None or parts.password is not None:
            raise ValidationException("Url must not hold credentials (the request is signed instead).")
        if parts.scheme == "http" and not self.allow_http:
            raise ValidationException("Url must be https:// (the operator may allow http:// on a trusted network "
                                      "with OPENKMS_ROTATION_ALLOW_HTTP=1).")
        return url

    def get(self, account_id: str, name: str) -> RotationFunction | None:
        with self.store.begin() as tx:
            row = tx.rotation_functions.get(account_id, name)
        return None if row is None else self._function(row)

    def by_arn(self, arn: str) -> RotationFunction | None:
        found = FUNCTION_ARN_RE.match(arn)
        if found is None or found.group(1) != self.region:
            return None
        return self.get(found.group(2), found.group(3))

    def list(self, account_id: str) -> list[RotationFunction]:
        with self.store.begin() as tx:
            rows = tx.rotation_functions.for_account(account_id)
        return [self._function(r) for r in rows]

    def delete(self, account_id: str, name: str) -> None:
        with self.store.begin() as tx:
            if not tx.rotation_functions.delete(account_id, name):
                raise NotFoundException(f"No rotation function named {name} in account {account_id}.")

    def _function(self, row: Any) -> RotationFunction:
        config = json.loads(row.config)
        try:
            aad = _aad(row.account_id, row.name, row.kind, row.config)
            parts = json.loads(self.root.unseal(bytes(row.sealed), aad))
        except InvalidCiphertextException:
            raise KMSInternalException("A rotation function's sealed settings failed their integrity check.") from None
        signing = parts.get("signing_secret")
        return RotationFunction(
            row.account_id, row.name, row.kind, datetime.fromtimestamp(row.created).astimezone(),
            url=config.get("url"), command=tuple(config.get("command") or ()), timeout_s=int(config["timeout_s"]),
            password_length=int(config["password_length"]), exclude_characters=config.get("exclude_characters") or "",
            allowed_hosts=tuple(config.get("allowed_hosts") or ()), master_secret_arn=config.get("master_secret_arn"),
            signing_secret=SecretStr(signing) if signing else None,
            environment=tuple((k, SecretStr(v)) for k, v in sorted((parts.get("environment") or {}).items())))


# -- invoking a webhook or a command ------------------------------------------------------------------
def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The X-OpenKMS-Signature value for `body` sent at `timestamp` (what a receiver recomputes)."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, now: float | None = None, tolerance_s: int = 300) -> bool:
    """For receivers (and tests): whether `header` signs `body` with `secret`, within `tolerance_s`."""
    try:
        items = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(items["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), header)


class _PinnedConnection(http.client.HTTPSConnection):
    """HTTPS to the address that was checked (not one a second DNS answer gives), with the
    certificate checked against the URL's host name."""

    def __init__(self, host: str, port: int, address: str, context: ssl.SSLContext | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._ssl = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._ssl.wrap_socket(sock, server_hostname=self.host) if self._ssl is not None else sock


def checked_address(host: str, port: int, allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> str:
    """The address a webhook's host resolves to, if it may be called: a public address, or one in
    the operator's OPENKMS_ROTATION_ALLOWED_NETWORKS; never this machine or a private network
    otherwise (an account administrator must not reach what the server can)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise StepFailed("the webhook's host name does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if any(address in network for network in allowed) or (address.is_global and not address.is_multicast):
            return str(address)
    raise StepFailed("the webhook's address is not a public one (an operator can allow networks with "
                     "OPENKMS_ROTATION_ALLOWED_NETWORKS)")


def call_webhook(fn: RotationFunction, payload: dict[str, Any], ca_bundle: str, function_arn: str,
                 allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()) -> None:
    """POST the step to the webhook. Only a 2xx is success: a redirect is not followed (it could
    lead anywhere). Why a call failed is said coarsely (the account's administrator reads it); the
    server's log has the details."""
    assert fn.url is not None and fn.signing_secret is not None
    parts = urllib.parse.urlsplit(fn.url)
    host, tls = parts.hostname or "", parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    address = checked_address(host, port, allowed)
    body = json.dumps(payload).encode()
    context = ssl.create_default_context(cafile=ca_bundle or None) if tls else None
    conn = _PinnedConnection(host, port, address, context, fn.timeout_s)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("POST", target, body=body, headers={
            "Host": parts.netloc, "Content-Type": "application/json", "User-Agent": "openkms-secrets-rotation",
            SIGNATURE_HEADER: signature(fn.signing_secret.reveal(), int(time.time()), body),
            "X-OpenKMS-Function-Arn": function_arn})
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException, ValueError) as exc:
        log.warning("rotation webhook %s (%s) could not be called: %s", function_arn, address,
                    f"{type(exc).__name__}: {str(exc)[:200]}")
        raise StepFailed("the webhook could not be reached, or did not answer in time") from None
    finally:
        conn.close()
    if not 200 <= status < 300:
        raise StepFailed(f"the webhook answered HTTP {status}")


def run_command(fn: RotationFunction, payload: dict[str, Any], endpoint: str, region: str) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8"),
           "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": region, "AWS_DEFAULT_REGION": region}
    env.update({k: v.reveal() for k, v in fn.environment})
    try:
        done = subprocess.run(list(fn.command), input=json.dumps(payload).encode(), capture_output=True,
                              timeout=fn.timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"the command did not finish within {fn.timeout_s} s") from None
    except OSError as exc:
        raise StepFailed(f"the command could not be started: {type(exc).__name__}") from None
    if done.returncode != 0:
        raise StepFailed(f"the command exited with status {done.returncode}")
