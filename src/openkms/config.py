"""Typed settings. Every setting has an `OPENKMS_<NAME>` environment variable; flags override it."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ConfigurationError

DEFAULT_DATA_DIR = "./openkms-data"
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+\Z")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    storage_url: str = ""  # empty: SQLite at <data_dir>/openkms.db
    region: str = "us-east-1"
    # Root key: a key in an HSM token (root_pkcs11_*) if set, else a passphrase (stretched with
    # scrypt) if set, else the key file <data_dir>/root.key. The PIN and the passphrase are read from
    # the environment only, never from flags.
    root_passphrase: str = ""
    root_pkcs11_module: str = ""
    root_pkcs11_token_label: str = ""
    root_pkcs11_key_label: str = "openkms-root"
    root_pkcs11_pin: str = ""
    # How often the background scheduler looks for keys whose deletion window has ended.
    scheduler_interval: float = 60.0
    # How long a node trusts its cached view of a key or access key before reading the store again.
    # Changes made through this node, or heard of from another node sharing the same PostgreSQL
    # store (storage/notify.py), are seen at once; this bounds a change whose notification was lost.
    cache_ttl: float = 5.0
    # AWS's per-account request quotas (quotas.py), counted per node; False admits every call.
    quotas: bool = True
    log_level: str = "info"
    # "text" (a line per record) or "json" (one JSON object per line, for log collectors).
    log_format: str = "text"
    # A line per API call in the log "openkms.access": operation, status, latency, request id,
    # principal, source address; never parameters or data. Off by default: on this 2-core machine
    # it cost about a third of Encrypt's throughput (bench/encrypt.py: 1,896/s with it, 2,905/s without).
    access_log: bool = False
    # Audit: how often the writer signs a digest of its chain, and how many days records stay in
    # the store before they are archived to files under <data_dir>/audit-archive (0: never).
    audit: str = "on"  # "off" records nothing: for measuring what auditing costs, not for production
    audit_digest_interval: float = 60.0
    audit_retention_days: float = 0.0
    # Share the listening port with other processes (SO_REUSEPORT): only for running several
    # servers of one deployment behind one port on purpose. Off, a port in use refuses the start.
    reuse_port: bool = False
    # TLS on the API listener (PEM files); with tls_client_ca every client must present a
    # certificate that chains to it (mTLS). Listening beyond loopback without TLS needs insecure_http.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    insecure_http: bool = False
    # Metrics (Prometheus text format): on a port of their own (HOST:PORT, no authentication)
    # and/or as GET /metrics on the API listener behind `Authorization: Bearer <metrics_token>`.
    metrics_listen: str = ""
    metrics_token: str = ""
    # External key stores: how this node reaches XKS proxies. The proxy's certificate is checked
    # against xks_ca_bundle (PEM; empty: the system's CAs); xks_client_cert/_key are presented to
    # proxies that require mTLS; http:// endpoints only with xks_allow_http. Each proxy call has
    # xks_timeout_ms (a retry included), and each store at most xks_rate_limit calls/s on this node.
    xks_ca_bundle: str = ""
    xks_client_cert: str = ""
    xks_client_key: str = ""
    xks_allow_http: bool = False
    xks_timeout_ms: int = 250
    xks_rate_limit: float = 1800.0
    xks_health_interval: float = 60.0  # seconds between health checks of each connected proxy
    # HSM key stores: each store's cryptographic calls at most hsm_rate_limit a second on this node
    # (AWS's custom key store request quota, 1,800/s for each CloudHSM key store).
    hsm_rate_limit: float = 1800.0
    # Threads for calls that wait on an HSM or an XKS proxy (off the event loop).
    blocking_threads: int = 64
    # Secrets Manager's webhook rotation functions: the receiver's certificate is checked against
    # rotation_ca_bundle (PEM; empty: the system's CAs); http:// URLs only with rotation_allow_http.
    rotation_ca_bundle: str = ""
    rotation_allow_http: bool = False
    # Networks (CIDRs, comma-separated) a webhook may be on besides public addresses: e.g. a
    # receiver in the operator's own network. Loopback and private networks are refused otherwise.
    rotation_allowed_networks: str = ""

    def __repr__(self) -> str:  # the passphrase and the PIN must never reach a log
        secret = ("root_passphrase", "root_pkcs11_pin", "metrics_token")
        shown = {f.name: ("***" if getattr(self, f.name) else "") if f.name in secret else getattr(self, f.name)
                 for f in fields(self)}
        return f"Settings({shown})"

    def rotation_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(part.strip(), strict=False)
                     for part in self.rotation_allowed_networks.split(",") if part.strip())

    def check_exposure(self) -> str | None:
        """ConfigurationError for plain HTTP beyond loopback, unless insecure_http; then the warning
        to give at every start (None: nothing to warn about)."""
        if self.tls_cert or is_loopback(self.host):
            return None
        if not self.insecure_http:
            raise ConfigurationError(
                f"refusing to listen on {self.host} without TLS: data keys and secrets would cross the network in "
                "the clear. Give --tls-cert and --tls-key, or --insecure-http if something else encrypts the traffic")
        return (f"WARNING: serving plain HTTP on {self.host} (--insecure-http): data keys, secrets and access keys "
                "cross the network in the clear unless something else encrypts the traffic")

    def metrics_address(self) -> tuple[str, int]:
        host, _, port = self.metrics_listen.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigurationError(f"bad metrics-listen {self.metrics_listen!r}: give HOST:PORT, e.g. 127.0.0.1:9464")
        return host.strip("[]"), int(port)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def database_url(self) -> str:
        if self.storage_url:
            return self.storage_url
        return f"sqlite:///{(self.data_dir / 'openkms.db').resolve()}"

    @property
    def is_embedded(self) -> bool:
        return not self.storage_url or self.storage_url.startswith("sqlite")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from OPENKMS_* variables, then explicit overrides (flags) that are not None."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"OPENKMS_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = raw
        for name, value in overrides.items():
            if value is not None:
                values[name] = value
        converted: dict[str, object] = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            try:
                if kind == "int":
                    converted[f.name] = int(value)  # type: ignore[call-overload]
                elif kind == "float":
                    converted[f.name] = float(value)  # type: ignore[arg-type]
                elif kind == "bool":
                    converted[f.name] = value if isinstance(value, bool) else _flag(str(value))
                elif kind == "Path":
                    converted[f.name] = Path(str(value))
                else:
                    converted[f.name] = str(value)
            except ValueError:
                name = f.name.replace("_", "-")
                raise ConfigurationError(
                    f"bad {name} {str(value)!r} (--{name} or OPENKMS_{f.name.upper()}): "
                    f"it must be {'a number' if kind in ('int', 'float') else 'true or false'}") from None
        settings = cls(**converted)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings no server could run with, with a message naming the setting."""
        if not 1 <= self.port <= 65535:
            raise ConfigurationError(f"bad port {self.port}: a port is a number from 1 to 65535")
        if not self.host or any(c.isspace() for c in self.host):
            raise ConfigurationError(f"bad host {self.host!r}: give an address or a host name to listen on")
        if not REGION_RE.match(self.region):
            raise ConfigurationError(f"bad region {self.region!r}: a region looks like us-east-1")
        if not 10 <= self.xks_timeout_ms <= 60000:
            raise ConfigurationError(f"bad xks-timeout-ms {self.xks_timeout_ms}: from 10 to 60000")
        if not 1 <= self.blocking_threads <= 1024:
            raise ConfigurationError(f"bad blocking-threads {self.blocking_threads}: from 1 to 1024")
        if self.xks_rate_limit <= 0:
            raise ConfigurationError(f"bad xks-rate-limit {self.xks_rate_limit:g}: calls per second, above 0")
        if self.hsm_rate_limit <= 0:
            raise ConfigurationError(f"bad hsm-rate-limit {self.hsm_rate_limit:g}: calls per second, above 0")
        for name in ("xks_ca_bundle", "xks_client_cert", "xks_client_key", "rotation_ca_bundle", "tls_cert", "tls_key",
                     "tls_client_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigurationError(f"OPENKMS_{name.upper()} {path}: no such file")
        try:
            self.rotation_networks()
        except ValueError:
            raise ConfigurationError(f"bad rotation-allowed-networks {self.rotation_allowed_networks!r}: give "
                                     "networks such as 10.0.0.0/8,192.0.2.7/32, comma-separated") from None
        if self.log_format not in ("text", "json"):
            raise ConfigurationError(f"bad log-format {self.log_format!r}: text or json (OPENKMS_LOG_FORMAT)")
        if self.metrics_listen:
            self.metrics_address()
        if self.metrics_token and len(self.metrics_token) < 16:
            raise ConfigurationError("OPENKMS_METRICS_TOKEN must be at least 16 characters")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigurationError("--tls-cert and --tls-key go together (OPENKMS_TLS_CERT, OPENKMS_TLS_KEY)")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigurationError("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")
        if bool(self.xks_client_cert) != bool(self.xks_client_key):
            raise ConfigurationError("OPENKMS_XKS_CLIENT_CERT and OPENKMS_XKS_CLIENT_KEY go together")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)
