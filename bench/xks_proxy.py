"""`openkms xks-proxy` alone under wrk: Encrypt of 32 bytes through the proxy into SoftHSM2, over TLS.

    python bench/xks_proxy.py [--duration 10] [--connections 64] [--repeat 3] [--plain-http] [--json]

Starts one real proxy process (its own SoftHSM2 token directory and token, a test CA and server
certificate made with openssl, TLS 1.3 as AWS KMS connects) with one AES-256 key made by `openkms
xks-proxy keys create`. Each workload is one XKS request signed with botocore's SigV4Auth (service
kms-xks-proxy), sent once (it must answer 200), then replayed by wrk (a signature replays for 5
minutes, so each run is signed afresh):

- `encrypt+cdiv`: what AWS KMS sends: 32 bytes of plaintext, 64 bytes of AAD and
  ciphertextDataIntegrityValueAlgorithm SHA_256 (so the proxy also decrypts once to vouch for it);
- `encrypt`: the same without the integrity value (one token call instead of two);
- `decrypt`: the ciphertext of the first, decrypted.

Rounds alternate the workloads (A B C, C B A, ...). It prints req/s, p50, p99 per workload and
whether the issue's target is met (>= 3,000 encrypt/s at 64 connections, for `encrypt+cdiv`); it
asserts nothing about timing. Exit status: 0 measured, 1 a run failed, 2 a tool is missing (wrk,
softhsm2-util, openssl).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The repository root, for `tests` and `bench` when run as `python bench/xks_proxy.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._load import (
    BenchError,
    LoadOptions,
    SignedRequest,
    WrkStats,
    check_replay,
    measure_alternating,
    median_stats,
    met_text,
    progress,
    run_bench,
    table_header,
    table_row,
)
from tests.xks_proxy_helpers import (
    PIN,
    SOFTHSM_MODULE,
    Pki,
    ProxyProcess,
    Store,
    b64,
    cli,
    free_port,
    metadata,
    proxy_toml,
    signed_headers,
)

TARGET_RPS = 3000.0
KEY = "bench-key"
PREFIX = "/bench"


@dataclass
class Workload:
    label: str
    url: str
    document: dict[str, Any]
    credential: tuple[str, str]
    runs: list[WrkStats] = field(default_factory=list)

    def request(self) -> SignedRequest:
        body = json.dumps(self.document, separators=(",", ":")).encode()
        headers = signed_headers(self.url, body, *self.credential)
        headers["Host"] = self.url.split("://", 1)[1].split("/", 1)[0]  # what wrk and urllib send, signed
        return SignedRequest("POST", self.url, headers, body)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    defaults = LoadOptions()
    parser.add_argument("--duration", type=int, default=defaults.duration, help="seconds of each measured run (10)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="seconds of each warm-up run (2)")
    parser.add_argument("--connections", type=int, default=defaults.connections, help="wrk connections (64)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="wrk threads (2)")
    parser.add_argument("--repeat", type=int, default=3, help="measured runs per workload; medians (3)")
    parser.add_argument("--plain-http", action="store_true", help="no [tls]: plain HTTP on loopback")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    args = parser.parse_args(argv)
    for name in ("duration", "warmup", "connections", "threads", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def softhsm(workdir: Path) -> str:
    """A token directory of this run (SOFTHSM2_CONF, inherited by the proxy) and a token in it."""
    if shutil.which("softhsm2-util") is None or not Path(SOFTHSM_MODULE).exists():
        raise BenchError("SoftHSM2 is not installed (Debian package softhsm2)")
    if shutil.which("openssl") is None:
        raise BenchError("openssl is not installed")
    tokens = workdir / "tokens"
    tokens.mkdir()
    conf = workdir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "xks-bench", "--so-pin", "so-pin-1234",
                    "--pin", PIN], check=True, capture_output=True)
    return "xks-bench"


def run(args: argparse.Namespace, workdir: Path) -> list[Workload]:
    options = LoadOptions(duration=args.duration, warmup=args.warmup, connections=args.connections,
                          threads=args.threads, repeat=args.repeat)
    label = softhsm(workdir)
    pki = None if args.plain_http else Pki(workdir / "pki")
    if pki is not None:
        os.environ["SSL_CERT_FILE"] = str(pki.ca)  # so that the first, checked request trusts the test CA
    store = Store.new(PREFIX)
    port = free_port()
    config = workdir / "xks-proxy.toml"
    config.write_text(proxy_toml(port=port, token_label=label, stores=[store], pki=pki))
    made = cli("keys", "create", "--config", str(config), "--label", KEY)
    if made.returncode != 0:
        raise BenchError(f"keys create failed: {made.stderr.strip()}")
    proxy = ProxyProcess(config, port, tls=pki is not None)
    progress(f"starting openkms xks-proxy on {proxy.base}")
    try:
        try:
            proxy.start()
        except RuntimeError as exc:
            raise BenchError(str(exc)) from exc
        base = f"{proxy.base}{PREFIX}/kms/xks/v1/keys/{KEY}"
        credential = store.credentials[0]
        sealing = {"requestMetadata": metadata("Encrypt", "bench-encrypt"), "plaintext": b64(os.urandom(32)),
                   "encryptionAlgorithm": "AES_GCM", "additionalAuthenticatedData": b64(os.urandom(64))}
        with_cdiv = dict(sealing, ciphertextDataIntegrityValueAlgorithm="SHA_256")
        cdiv = Workload("encrypt+cdiv", f"{base}/encrypt", with_cdiv, credential)
        sealed = json.loads(check_replay(cdiv.request(), cdiv.label))
        opening = {"requestMetadata": metadata("Decrypt", "bench-decrypt"), "encryptionAlgorithm": "AES_GCM",
                   "additionalAuthenticatedData": sealing["additionalAuthenticatedData"],
                   **{k: sealed[k] for k in ("ciphertext", "initializationVector", "authenticationTag")}}
        workloads = [cdiv, Workload("encrypt", f"{base}/encrypt", sealing, credential),
                     Workload("decrypt", f"{base}/decrypt", opening, credential)]
        measure_alternating(workloads, options)
        return workloads
    except BenchError as exc:
        raise BenchError(f"{exc}\n--- the proxy's log (end) ---\n{proxy.output()[-3000:]}") from exc
    finally:
        proxy.stop()


def summarize(workloads: list[Workload], args: argparse.Namespace, load_before: float) -> dict[str, Any]:
    medians = {w.label: median_stats(w.runs) for w in workloads}
    cdiv = medians["encrypt+cdiv"]
    return {
        "benchmark": "xks_proxy",
        "transport": "http (loopback)" if args.plain_http else "https (TLS 1.3)",
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "wrk": LoadOptions(duration=args.duration, warmup=args.warmup, connections=args.connections,
                           threads=args.threads, repeat=args.repeat).summary(),
        "results": {w.label: {"median": medians[w.label], "runs": w.runs} for w in workloads},
        "targets": {"encrypt_req_per_sec": {"want": f">= {TARGET_RPS:g}", "value": cdiv["requests_per_sec"],
                                            "met": cdiv["requests_per_sec"] >= TARGET_RPS}},
    }


def print_table(summary: dict[str, Any]) -> None:
    wrk = summary["wrk"]
    load = LoadOptions(duration=wrk["duration_s"], warmup=wrk["warmup_s"], connections=wrk["connections"],
                       threads=wrk["threads"], repeat=wrk["runs"])
    print(f"openkms xks-proxy alone, SoftHSM2, {summary['transport']}, 32-byte plaintext, {load.describe()}, "
          f"{wrk['runs']} measured run(s) per workload (medians, rounds alternating), load average before "
          f"{summary['load_average_before']:.2f}, after {summary['load_average_after']:.2f}")
    print(table_header(name_width=14))
    for name, result in summary["results"].items():
        print(table_row(name, result["median"], name_width=14))
        print(f"  {name} runs req/s: " + " / ".join(f"{r['requests_per_sec']:,.0f}" for r in result["runs"]))
    print("encrypt+cdiv: as AWS KMS asks (64-byte AAD, SHA_256 integrity value: an encrypt and a verifying "
          "decrypt in the token); encrypt: without the integrity value; decrypt: its ciphertext back")
    target = summary["targets"]["encrypt_req_per_sec"]
    print(f"issue target: proxy alone >= {TARGET_RPS:,.0f} encrypt/s at {wrk['connections']} connections "
          f"{met_text(target['met'])} ({target['value']:,.0f}, encrypt+cdiv)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    return run_bench("bench/xks_proxy.py", args, lambda tmp: summarize(run(args, tmp), args, load_before),
                     print_table, needs_moto=False)


if __name__ == "__main__":
    sys.exit(main())
