"""The proxy's configuration file (TOML), checked whole when it is read.

Every value is checked against the spec's rules when the file is loaded (at start, and on each
SIGHUP), so that a bad file is refused with one line naming the setting instead of failing on the
first request: access key ids of 20-30 characters of A-Z and 2-7, secrets of 43-64 characters of
A-Za-z0-9+/=, URI path prefixes that keep XksProxyUriPath within AWS KMS's pattern and 128
characters, external key ids of the spec's alphabet. Unknown names are refused too, so a typo
(or a name from another proxy's file) does not silently turn a setting off.

The token user's PIN is never in the file: only the environment variable OPENKMS_XKS_PKCS11_PIN
gives it (`read_pin`), so the file can be shared, versioned and shown without exposing the HSM.
Secrets in the file are held as SecretStr and never appear in a repr or a log line.
"""

from __future__ import annotations

import ipaddress
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..keystore import xks as spec  # the spec's constants: one copy, for both sides
from ..model import SecretStr

PIN_VARIABLE = "OPENKMS_XKS_PKCS11_PIN"
API_PATH = spec.API
SERVICE = spec.SERVICE
MIN_PLAINTEXT = spec.MIN_PLAINTEXT

ACCESS_KEY_ID_RE = re.compile(r"[A-Z2-7]{20,30}\Z")
SECRET_RE = re.compile(r"[A-Za-z0-9+/=]{43,64}\Z")
# AWS KMS's XksProxyUriPath is ^(/[a-zA-Z0-9/_-]+/kms/xks/v\d{1,2})$|^(/kms/xks/v\d{1,2})$, at most
# 128 characters: so a prefix is empty or a slash and those characters, at most 117 of them.
PREFIX_RE = re.compile(r"(/[A-Za-z0-9_-]+)+\Z")
MAX_PREFIX = 128 - len(API_PATH)
XKS_KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
REGION_RE = re.compile(r"[a-z0-9-]{1,40}\Z")
SERVER_NAME_RE = re.compile(r"([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(:[0-9]{1,5})?\Z")

# The spec's minimums (what a proxy MUST accept: MIN_PLAINTEXT too) and the hard ceilings of the
# AAD layout.
MIN_AAD = 8192
MAX_AAD_LAYOUT = 0xFFFF  # the HSM's AAD carries the length in 2 bytes
MAX_PLAINTEXT_CEILING = 65536


class ConfigError(Exception):
    """The file cannot be used: one line saying where and why (never a secret's value)."""


def valid_key_id(key_id: str) -> bool:
    """Whether `key_id` is an externalKeyId the spec allows (and that SigV4 signs as written)."""
    return XKS_KEY_ID_RE.match(key_id) is not None and key_id not in (".", "..")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8443
    region: str = "us-east-1"  # the SigV4 scope AWS KMS signs with: the key store's region
    request_timeout_s: float = 5.0  # to read one request, and to answer it once read
    idle_timeout_s: float = 60.0  # a keep-alive connection with no request in flight
    max_connections: int = 1024  # past it, the longest-idle connection is closed to make room
    max_handshakes: int = 256  # connections still in their TLS handshake (a part of max_connections)
    # The Host headers this proxy answers (None: any); a request signed for another proxy that shares
    # the credentials is refused before its signature is checked.
    server_names: frozenset[str] | None = None


@dataclass(frozen=True)
class TlsSettings:
    cert: Path
    key: Path
    client_ca: Path | None = None
    client_dns_name: str | None = None
    client_any_name: bool = False  # client_ca without client_dns_name, asked for explicitly


@dataclass(frozen=True)
class Pkcs11Settings:
    module: str
    token_label: str
    call_timeout_s: float = 2.0  # a token call slower than this answers DependencyTimeoutException


@dataclass(frozen=True)
class HealthSettings:
    test_key_label: str = "xks-health"
    cache_seconds: float = 10.0  # the spec: a cached health result is at most a minute old
    fleet_size: int = 1


@dataclass(frozen=True)
class Limits:
    max_plaintext_bytes: int = MIN_PLAINTEXT
    max_aad_bytes: int = MIN_AAD

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read at all: the base64 of the largest plaintext and AAD, and
        room for requestMetadata (ARNs of up to 2048 characters each) and the other members."""
        return 4 * (self.max_plaintext_bytes + self.max_aad_bytes + 2 * 20 + 2 * 16) // 3 + 32 * 1024


@dataclass(frozen=True)
class Credential:
    access_key_id: str
    secret_access_key: SecretStr


@dataclass(frozen=True)
class KeyStoreSettings:
    """One external key store as AWS KMS sees it: a URI path prefix and its SigV4 credentials."""

    uri_path_prefix: str
    credentials: tuple[Credential, ...]
    xks_key_id_set: frozenset[str] | None = None  # None: every AES-256 key no other store lists
    disabled_xks_key_ids: frozenset[str] = frozenset()
    requests_per_second: int = 10000  # the per-prefix quota (AWS KMS's default is 1,800 per store)

    @property
    def uri_path(self) -> str:
        """XksProxyUriPath, as AWS KMS is configured with it."""
        return self.uri_path_prefix + API_PATH


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerSettings
    tls: TlsSettings | None
    pkcs11: Pkcs11Settings
    health: HealthSettings
    limits: Limits
    key_stores: tuple[KeyStoreSettings, ...] = field(default=())

    def key_store(self, prefix: str) -> KeyStoreSettings | None:
        return next((store for store in self.key_stores if store.uri_path_prefix == prefix), None)

    def claimed_key_ids(self) -> frozenset[str]:
        """Every key some store lists in its xks_key_id_set: a store without one may use every key of
        the token but these (a key listed for one tenant is never another's by default)."""
        return frozenset().union(*(store.xks_key_id_set for store in self.key_stores
                                   if store.xks_key_id_set is not None))

    def isolation_warning(self) -> str | None:
        """A line for the log when several stores share the token and one has no allow-list."""
        open_ = [store.uri_path_prefix or "(no prefix)" for store in self.key_stores if store.xks_key_id_set is None]
        if len(self.key_stores) < 2 or not open_:
            return None
        each = "it" if len(open_) == 1 else "each"
        return (f"[[external_key_stores]] {', '.join(open_)}: no xks_key_id_set, so {each} may use every AES-256 "
                "key of the token that no other store lists, keys made later included; give every store its own "
                "xks_key_id_set to keep them apart")


class _Table:
    """One TOML table, read name by name; what is left unread at the end is an unknown name."""

    def __init__(self, where: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table")
        self.where = where
        self._values: dict[str, Any] = dict(value)

    def _take(self, name: str, kind: type | tuple[type, ...], required: bool) -> Any:
        if name not in self._values:
            if required:
                raise ConfigError(f"{self.where}: {name} is required")
            return None
        value = self._values.pop(name)
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(f"{self.where}: {name} must be a {names.replace('str', 'string')}")
        return value

    def string(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        value = self._take(name, str, required)
        return default if value is None else str(value)

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self._take(name, (int, float), False)
        if value is None:
            return default
        if not low <= value <= high:
            raise ConfigError(f"{self.where}: {name} must be between {low:g} and {high:g}")
        return float(value)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self._take(name, int, False)
        if value is None:
            return default
        if not low <= value <= high:
            raise ConfigError(f"{self.where}: {name} must be between {low} and {high}")
        return int(value)

    def flag(self, name: str, default: bool = False) -> bool:
        value = self._take(name, bool, False)
        return default if value is None else bool(value)

    def strings(self, name: str) -> list[str] | None:
        value = self._take(name, list, False)
        if value is None:
            return None
        if not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{self.where}: {name} must be a list of strings")
        return list(value)

    def tables(self, name: str, required: bool = False) -> list[Any]:
        value = self._take(name, list, required)
        return [] if value is None else list(value)

    def done(self) -> None:
        if self._values:
            unknown = ", ".join(sorted(self._values))
            raise ConfigError(f"{self.where}: unknown setting {unknown}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _relative(base: Path, value: str) -> Path:
    """Paths in the file are relative to the file's own directory, wherever the proxy starts."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _server_names(table: _Table) -> frozenset[str] | None:
    names = table.strings("server_names")
    if names is None:
        return None
    for name in names:
        if not SERVER_NAME_RE.match(name):
            raise ConfigError(f"{table.where}: server_names has {name!r}, not a host name (or [IPv6] address) "
                              "with an optional :port")
    if not names:
        raise ConfigError(f"{table.where}: server_names must name at least one host (leave it out to answer any)")
    return frozenset(name.lower() for name in names)


def _server(table: _Table) -> ServerSettings:
    host = table.string("host", "127.0.0.1") or "127.0.0.1"
    region = table.string("region", "us-east-1") or ""
    if not REGION_RE.match(region):
        raise ConfigError(f"{table.where}: region must be a region name such as us-east-1")
    max_connections = table.integer("max_connections", 1024, 1, 1_000_000)
    settings = ServerSettings(
        host=host, port=table.integer("port", 8443, 0, 65535), region=region,
        request_timeout_s=table.number("request_timeout_ms", 5000, 10, 600_000) / 1000,
        idle_timeout_s=table.number("idle_timeout_seconds", 60, 1, 86400),
        max_connections=max_connections,
        max_handshakes=table.integer("max_handshakes", default_max_handshakes(max_connections), 1,
                                     max_connections),
        server_names=_server_names(table))
    table.done()
    return settings


def default_max_handshakes(max_connections: int) -> int:
    """A quarter of the connections, at least 16 and at most 256 (never more than max_connections)."""
    return min(max_connections, max(16, min(256, max_connections // 4)))


def _tls(table: _Table, base: Path) -> TlsSettings:
    cert = table.string("cert", required=True) or ""
    key = table.string("key", required=True) or ""
    client_ca = table.string("client_ca")
    client_dns_name = table.string("client_dns_name")
    client_any_name = table.flag("client_any_name")
    table.done()
    if client_dns_name is not None and client_ca is None:
        raise ConfigError(f"{table.where}: client_dns_name needs client_ca (the CA that issues client certificates)")
    if client_dns_name is not None and not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", client_dns_name):
        raise ConfigError(f"{table.where}: client_dns_name must be a DNS name")
    if client_any_name and (client_ca is None or client_dns_name is not None):
        raise ConfigError(f"{table.where}: client_any_name = true goes with client_ca and without client_dns_name")
    if client_ca is not None and client_dns_name is None and not client_any_name:
        # With AWS KMS's client CAs (public Amazon Trust Services roots), any certificate they issued
        # to anyone would pass: the name is what makes the certificate AWS KMS's.
        raise ConfigError(f"{table.where}: client_ca without client_dns_name accepts any certificate the CA issued; "
                          "set client_dns_name (AWS KMS: cks.kms.<region>.amazonaws.com), or client_any_name = true "
                          "to accept that")
    return TlsSettings(_relative(base, cert), _relative(base, key),
                       _relative(base, client_ca) if client_ca is not None else None, client_dns_name,
                       client_any_name)


def _pkcs11(table: _Table) -> Pkcs11Settings:
    module = table.string("module", required=True) or ""
    token_label = table.string("token_label", required=True) or ""
    if "pin" in table._values or "user_pin" in table._values:
        raise ConfigError(f"{table.where}: the PIN is never read from the file; set {PIN_VARIABLE} instead")
    settings = Pkcs11Settings(module, token_label,
                              table.number("call_timeout_ms", 2000, 10, 600_000) / 1000)
    table.done()
    if not module or not token_label:
        raise ConfigError(f"{table.where}: module and token_label must not be empty")
    return settings


def _health(table: _Table) -> HealthSettings:
    label = table.string("test_key_label", "xks-health") or ""
    if not valid_key_id(label):
        raise ConfigError(f"{table.where}: test_key_label must be 1-128 characters of A-Z, a-z, 0-9, '.', '-', '_'")
    settings = HealthSettings(label, table.number("cache_seconds", 10, 0, 60), table.integer("fleet_size", 1, 1, 10000))
    table.done()
    return settings


def _limits(table: _Table) -> Limits:
    limits = Limits(table.integer("max_plaintext_bytes", MIN_PLAINTEXT, MIN_PLAINTEXT, MAX_PLAINTEXT_CEILING),
                    table.integer("max_aad_bytes", MIN_AAD, MIN_AAD, MAX_AAD_LAYOUT))
    table.done()
    return limits


def _key_ids(table: _Table, name: str) -> frozenset[str] | None:
    ids = table.strings(name)
    if ids is None:
        return None
    for key_id in ids:
        if not valid_key_id(key_id):
            raise ConfigError(f"{table.where}: {name} has {key_id!r}, not an external key id "
                              "(1-128 characters of A-Z, a-z, 0-9, '.', '-', '_')")
    return frozenset(ids)


def _key_store(table: _Table) -> KeyStoreSettings:
    prefix = table.string("uri_path_prefix", required=True) or ""
    if prefix and (not PREFIX_RE.match(prefix) or len(prefix) > MAX_PREFIX):
        raise ConfigError(f"{table.where}: uri_path_prefix must be empty or '/' and up to {MAX_PREFIX} characters "
                          "of A-Z, a-z, 0-9, '/', '-', '_' (no trailing '/')")
    where = f"{table.where} ({prefix or 'no prefix'})"
    if "sigv4_access_key_id" in table._values or "sigv4_secret_access_key" in table._values:
        raise ConfigError(f"{where}: give the credentials as credentials = [{{ access_key_id = ..., "
                          "secret_access_key = ... }}] (two or more to rotate them)")
    credentials: list[Credential] = []
    for i, entry in enumerate(table.tables("credentials", required=True)):
        item = _Table(f"{where}: credentials[{i}]", entry)
        akid = item.string("access_key_id", required=True) or ""
        secret = item.string("secret_access_key", required=True) or ""
        item.done()
        if not ACCESS_KEY_ID_RE.match(akid):
            raise ConfigError(f"{item.where}: access_key_id must be 20-30 characters of A-Z and 2-7")
        if not SECRET_RE.match(secret):
            raise ConfigError(f"{item.where} ({akid}): secret_access_key must be 43-64 characters of "
                              "A-Z, a-z, 0-9, '+', '/', '='")
        if any(c.access_key_id == akid for c in credentials):
            raise ConfigError(f"{item.where}: access_key_id {akid} appears twice (an id must name one secret)")
        credentials.append(Credential(akid, SecretStr(secret)))
    if not credentials:
        raise ConfigError(f"{where}: credentials must hold at least one credential")
    store = KeyStoreSettings(prefix, tuple(credentials), _key_ids(table, "xks_key_id_set"),
                             _key_ids(table, "disabled_xks_key_ids") or frozenset(),
                             table.integer("requests_per_second", 10000, 1, 10_000_000))
    table.done()
    return store


def parse(document: Mapping[str, Any], path: Path) -> Config:
    """The configuration from a parsed TOML document; ConfigError names the first problem."""
    top = _Table("top level", document)
    base = path.parent

    def section(name: str, required: bool = False) -> _Table | None:
        value = top._take(name, dict, required)
        return None if value is None else _Table(f"[{name}]", value)

    server = _server(section("server") or _Table("[server]", {}))
    tls_table = section("tls")
    tls = _tls(tls_table, base) if tls_table is not None else None
    pkcs11_table = section("pkcs11", required=True)
    assert pkcs11_table is not None
    pkcs11 = _pkcs11(pkcs11_table)
    health = _health(section("health") or _Table("[health]", {}))
    limits = _limits(section("limits") or _Table("[limits]", {}))
    stores = [_key_store(_Table(f"[[external_key_stores]] #{i + 1}", entry))
              for i, entry in enumerate(top.tables("external_key_stores", required=True))]
    top.done()

    if not stores:
        raise ConfigError("[[external_key_stores]]: at least one external key store is required")
    prefixes = [store.uri_path_prefix for store in stores]
    for prefix in prefixes:
        if prefixes.count(prefix) > 1:
            raise ConfigError(f"[[external_key_stores]]: uri_path_prefix {prefix!r} appears twice")
    for store in stores:
        if health.test_key_label in (store.xks_key_id_set or ()):
            raise ConfigError(f"[[external_key_stores]] ({store.uri_path_prefix or 'no prefix'}): xks_key_id_set has "
                              f"the health check's test key {health.test_key_label!r}; it never serves a KMS key")
    if tls is None and not _is_loopback(server.host):
        raise ConfigError(f"[server]: host {server.host} is not a loopback address, and without a [tls] section "
                          "the proxy serves plain HTTP only on one (add [tls] with cert and key)")
    return Config(path, server, tls, pkcs11, health, limits, tuple(stores))


def load(path: str | Path) -> Config:
    """Read and check the file: ConfigError (one line) if it cannot be used."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8") from None
    try:
        return parse(document, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def exposure_warning(path: Path) -> str | None:
    """A line for the log when the file (which holds the SigV4 secrets) is readable by others."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return None
    who = " and ".join(w for w, bit in (("its group", stat.S_IRGRP), ("every user", stat.S_IROTH)) if mode & bit)
    return (f"{path} is readable by {who} (mode {stat.S_IMODE(mode):04o}) and holds the SigV4 secrets: "
            f"chmod 600 {path}")


def read_pin(env: Mapping[str, str], token_label: str) -> SecretStr:
    """The token user's PIN from OPENKMS_XKS_PKCS11_PIN (never from the file or a flag)."""
    pin = env.get(PIN_VARIABLE, "")
    if not pin:
        raise ConfigError(f"set {PIN_VARIABLE} to the user PIN of token {token_label!r} "
                          "(the PIN is read only from the environment)")
    return SecretStr(pin)
