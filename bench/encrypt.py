"""Encrypt throughput and latency of openkms against moto_server, measured in the same run with wrk.

    python bench/encrypt.py [--duration 10] [--connections 64] [--skip-moto] [--storage-url URL] [--json]

Starts a real `openkms serve` (embedded SQLite unless --storage-url) and `moto_server` on loopback
ports, creates a symmetric key on each, signs one `TrentService.Encrypt` of 32 random bytes and has
wrk replay it: a short warm-up, then the measured run(s). Prints req/s, p50 and p99 per server, the
openkms/moto ratio of req/s, and whether the issue's targets are met. It prints; it asserts nothing
about timing. Exit status: 0 measured, 1 a run failed (a server, a non-200 answer), 2 a tool is missing.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The repository root, for `tests.server` and `bench` when run as `python bench/encrypt.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._load import (
    REGION,
    LoadOptions,
    SignedRequest,
    WrkStats,
    create_key,
    format_ratio,
    measure,
    median_stats,
    met_text,
    parse_load_args,
    ratio,
    run_bench,
    signed_request,
    table_header,
    table_row,
)
from bench._moto import openkms_hint, running_servers

PLAINTEXT_BYTES = 32
# The targets for openkms on this workload.
TARGET_REQ_PER_SEC = 5000.0
TARGET_P99_MS = 20.0
TARGET_RATIO = 20.0


@dataclass
class Target:
    """One server under load: where it is, how to sign for it, and what was measured."""

    name: str
    endpoint: str
    access_key_id: str
    secret_access_key: str
    key_id: str = ""
    runs: list[WrkStats] = field(default_factory=list)

    def encrypt_request(self) -> SignedRequest:
        """A freshly signed Encrypt of new random bytes (a signature replays for 5 minutes)."""
        plaintext = base64.b64encode(os.urandom(PLAINTEXT_BYTES)).decode()
        payload = {"KeyId": self.key_id, "Plaintext": plaintext}
        return signed_request(self.endpoint, "TrentService.Encrypt", payload, self.access_key_id,
                              self.secret_access_key, region=REGION)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_load_args(__doc__, argv)


def run(args: argparse.Namespace, workdir: Path) -> list[Target]:
    load = LoadOptions.from_args(args)
    with running_servers(workdir, storage_url=args.storage_url, moto=not args.skip_moto) as servers:
        targets = []
        for name, server in servers:
            target = Target(name, server.endpoint, server.access_key_id, server.secret_access_key)
            hint = openkms_hint(args.storage_url) if name == "openkms" else ""
            target.key_id = create_key(name, server.client(), hint, Description="bench/encrypt.py")
            targets.append(target)
        for target in targets:
            target.runs = measure(target.name, target.encrypt_request, load)
    return targets


def summarize(targets: list[Target], args: argparse.Namespace, load_before: float) -> dict[str, Any]:
    medians = {t.name: median_stats(t.runs) for t in targets}
    ours = medians["openkms"]
    ours_over_moto = ratio(ours, medians.get("moto"))
    p99 = ours["latency_ms"]["99"]
    return {
        "benchmark": "encrypt",
        "operation": "TrentService.Encrypt",
        "plaintext_bytes": PLAINTEXT_BYTES,
        "storage": "postgresql" if args.storage_url else "sqlite (embedded)",
        # Other work on the box skews every figure: how busy it was just before the servers started.
        "load_average_before": round(load_before, 2),
        "wrk": LoadOptions.from_args(args).summary(),
        "results": {t.name: {"median": medians[t.name], "runs": t.runs} for t in targets},
        "ratio_req_per_sec": ours_over_moto,
        "targets": {
            "req_per_sec": {"want": f">= {TARGET_REQ_PER_SEC:g}", "value": ours["requests_per_sec"],
                            "met": ours["requests_per_sec"] >= TARGET_REQ_PER_SEC},
            "p99_ms": {"want": f"< {TARGET_P99_MS:g}", "value": p99, "met": p99 < TARGET_P99_MS},
            "ratio_vs_moto": {"want": f">= {TARGET_RATIO:g}", "value": ours_over_moto,
                              "met": None if ours_over_moto is None else ours_over_moto >= TARGET_RATIO},
        },
    }


def print_table(summary: dict[str, Any]) -> None:
    wrk = summary["wrk"]
    load = LoadOptions(duration=wrk["duration_s"], warmup=wrk["warmup_s"], connections=wrk["connections"],
                       threads=wrk["threads"], repeat=wrk["runs"])
    print(f"Encrypt of {summary['plaintext_bytes']} bytes, {load.describe()}, {wrk['runs']} measured run(s) "
          f"per server (medians), openkms storage: {summary['storage']}, "
          f"load average before {summary['load_average_before']:.2f}")
    print(table_header())
    for name, result in summary["results"].items():
        print(table_row(name, result["median"]))
    ratio_text = format_ratio(summary["ratio_req_per_sec"])
    print(f"openkms/moto req/s: {ratio_text}")
    t = summary["targets"]
    print(f"issue targets: >= {TARGET_REQ_PER_SEC:,.0f} Encrypt/s {met_text(t['req_per_sec']['met'])} "
          f"({t['req_per_sec']['value']:,.0f}); p99 < {TARGET_P99_MS:g} ms {met_text(t['p99_ms']['met'])} "
          f"({t['p99_ms']['value']:.2f} ms); >= {TARGET_RATIO:g}x moto_server "
          f"{met_text(t['ratio_vs_moto']['met'])} ({ratio_text})")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    return run_bench("bench/encrypt.py", args, lambda tmp: summarize(run(args, tmp), args, load_before),
                     print_table, needs_moto=not args.skip_moto)

if __name__ == "__main__":
    sys.exit(main())
