"""Encrypt through a key in an external key store (openkms -> `openkms xks-proxy` -> SoftHSM2) beside
a key of the default store, with wrk.

    python bench/xks.py [--duration 10] [--connections 64] [--repeat 3] [--storage-url URL] [--json]

Starts, in one run: an `openkms xks-proxy` process over TLS (a test CA and server certificate made
with openssl, its own SoftHSM2 token with one AES-256 key), and two real `openkms serve` processes
(embedded SQLite unless --storage-url), auditing on as deployed. On the first, an external key store
is created on the proxy and connected, and two keys made: one in the external key store (every
Encrypt is double encryption: the key's own material, then the external key through the proxy),
one in the default store. The second server has no custom key store: its default-store key is the
baseline. One signed `TrentService.Encrypt` of 32 random bytes per key is replayed by wrk: a
warm-up each, then the measured runs, rounds interleaved. Prints req/s, p50 and p99 per key, the
ratios, the CPU each request cost openkms (its processes: the worker and the audit writer) and the
proxy (from /proc, around each measured run; medians), and whether the issue's targets are met
(>= 1,800 Encrypt/s, AWS's default quota per external key store, with p99 < 100 ms; the default
store's figure unchanged beside it). The
server's per-store rate limit is raised for the run, so that it measures the path, not the quota.
It prints; it asserts nothing about timing. Exit status: 0 measured, 1 a run failed, 2 a tool is
missing (wrk, softhsm2-util, openssl).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# The repository root, for `tests.server` and `bench` when run as `python bench/xks.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._beside import Target, print_table, summarize
from bench._load import (
    BenchError,
    LoadOptions,
    lift_quotas,
    measure_alternating,
    parse_load_args,
    process_cpu_seconds,
    progress,
    run_bench,
)
from bench._moto import bootstrap_env
from tests.server import ServerProcess
from tests.xks_proxy_helpers import PIN, SOFTHSM_MODULE, Pki, ProxyProcess, Store, cli, free_port, proxy_toml

TARGET_RPS = 1800.0
TARGET_P99_MS = 100.0
KEY = "bench-key"
PREFIX = "/bench"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_load_args(__doc__, argv, peer=False)


def start_proxy(workdir: Path) -> tuple[ProxyProcess, Pki, Store, dict[str, str]]:
    """A token with the proxy's key, and the proxy over TLS; (proxy, pki, store, SoftHSM env)."""
    import subprocess

    for tool in ("softhsm2-util", "openssl"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    if not Path(SOFTHSM_MODULE).exists():
        raise BenchError("SoftHSM2 is not installed (Debian package softhsm2)")
    tokens = workdir / "tokens"
    tokens.mkdir()
    conf = workdir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {"SOFTHSM2_CONF": str(conf)}
    os.environ.update(env)  # the proxy and `keys create` inherit it
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "xks-bench", "--so-pin", "so-pin-1234",
                    "--pin", PIN], env={**os.environ, **env}, check=True, capture_output=True)
    pki = Pki(workdir / "pki")
    store, port = Store.new(PREFIX, 1, requests_per_second=100000), free_port()
    config = workdir / "xks-proxy.toml"
    config.write_text(proxy_toml(port=port, token_label="xks-bench", stores=[store], pki=pki))
    done = cli("keys", "create", "--config", str(config), "--label", KEY)
    if done.returncode != 0:
        raise BenchError(f"xks-proxy keys create failed: {done.stderr.strip()}")
    progress("starting openkms xks-proxy (TLS) in front of SoftHSM2")
    return ProxyProcess(config, port, tls=True).start(), pki, store, env


class CpuPerRequest:
    """`around` for measure_alternating: the CPU microseconds per request of each target's server
    (its process tree) and of the proxy, per measured run."""

    def __init__(self, proxy_pid: int) -> None:
        self.proxy_pid = proxy_pid
        self.runs: dict[str, list[tuple[float, float]]] = {}

    @contextlib.contextmanager
    def __call__(self, target: Any) -> Iterator[None]:
        assert target.server.proc is not None
        server_pid = target.server.proc.pid
        before = (process_cpu_seconds(server_pid), process_cpu_seconds(self.proxy_pid))
        yield
        requests = max(target.runs[-1]["requests"], 1)
        self.runs.setdefault(target.name, []).append(
            (1e6 * (process_cpu_seconds(server_pid) - before[0]) / requests,
             1e6 * (process_cpu_seconds(self.proxy_pid) - before[1]) / requests))

    def medians(self) -> dict[str, dict[str, float]]:
        return {name: {"openkms_us": round(statistics.median(r[0] for r in runs), 1),
                       "proxy_us": round(statistics.median(r[1] for r in runs), 1)}
                for name, runs in self.runs.items()}


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[Target], dict[str, dict[str, float]]]:
    options = LoadOptions.from_args(args)
    proxy, pki, store, env = start_proxy(workdir)
    xks_env = {"OPENKMS_XKS_CA_BUNDLE": str(pki.ca), "OPENKMS_XKS_RATE_LIMIT": "1000000"}
    with_xks = ServerProcess(workdir / "with-xks", storage_url=args.storage_url,
                             env=bootstrap_env() | env | xks_env)
    baseline = ServerProcess(workdir / "baseline", env=bootstrap_env())
    progress("starting openkms (with an external key store) and openkms (baseline, no custom key store)")
    try:
        for server in (with_xks, baseline):
            try:
                server.start()
                lift_quotas(server)
            except RuntimeError as exc:
                raise BenchError(str(exc)) from exc
        kms = with_xks.client()
        access_key_id, secret = store.credentials[0]
        cks = kms.create_custom_key_store(
            CustomKeyStoreName="bench", CustomKeyStoreType="EXTERNAL_KEY_STORE",
            XksProxyUriEndpoint=f"https://localhost:{proxy.port}", XksProxyUriPath=f"{PREFIX}/kms/xks/v1",
            XksProxyConnectivity="PUBLIC_ENDPOINT",
            XksProxyAuthenticationCredential={"AccessKeyId": access_key_id, "RawSecretAccessKey": secret},
        )["CustomKeyStoreId"]
        kms.connect_custom_key_store(CustomKeyStoreId=cks)
        entry = kms.describe_custom_key_stores(CustomKeyStoreId=cks)["CustomKeyStores"][0]
        if entry["ConnectionState"] != "CONNECTED":
            raise BenchError(f"the external key store did not connect: {entry['ConnectionState']} "
                             f"{entry.get('ConnectionErrorCode', '')}")
        xks_key = kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=cks, XksKeyId=KEY)["KeyMetadata"]
        targets = [
            Target("baseline", baseline, baseline.client().create_key()["KeyMetadata"]["KeyId"]),
            Target("default", with_xks, kms.create_key()["KeyMetadata"]["KeyId"]),
            Target("xks", with_xks, xks_key["KeyId"]),
        ]
        assert proxy.proc is not None
        cpu = CpuPerRequest(proxy.proc.pid)
        measure_alternating(targets, options, around=cpu)
        return targets, cpu.medians()
    finally:
        for server in (with_xks, baseline):
            server.stop()
        proxy.stop()


LEGEND = ("baseline: a default-store key on a server with no custom key store; default: a default-store key "
          "beside the external key store; xks: a key in the external key store (openkms -> xks-proxy over TLS "
          "-> SoftHSM2, all on this machine)")


def measure(args: argparse.Namespace, workdir: Path, load_before: float) -> dict[str, Any]:
    targets, cpu = run(args, workdir)
    summary = summarize("xks", "xks", targets, args, load_before, TARGET_RPS, TARGET_P99_MS)
    summary["cpu_us_per_request"] = cpu
    return summary


def show(summary: dict[str, Any]) -> None:
    print_table(summary, LEGEND, "external-store")
    print("CPU per request (medians of the runs, /proc): " + "; ".join(
        f"{name}: openkms {c['openkms_us']:,.0f} us" + (f", proxy {c['proxy_us']:,.0f} us" if name == "xks" else "")
        for name, c in summary["cpu_us_per_request"].items()))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    return run_bench("bench/xks.py", args, lambda tmp: measure(args, tmp, load_before), show, needs_moto=False)


if __name__ == "__main__":
    sys.exit(main())
