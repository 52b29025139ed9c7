"""What bench/hsm.py and bench/xks.py share: a key of a custom key store measured beside a
default-store key on the same server and a baseline server with no custom key store, rounds
interleaved; the medians, the ratios and the issue's targets, as a dict and as a table."""

from __future__ import annotations

import argparse
import base64
import os
from dataclasses import dataclass, field
from typing import Any

from bench._load import (
    REGION,
    LoadOptions,
    SignedRequest,
    WrkStats,
    median_stats,
    met_text,
    signed_request,
    table_header,
    table_row,
)
from tests.server import ServerProcess


@dataclass
class Target:
    """One key under load: `name` is baseline, default, or the custom store's short name."""

    name: str
    server: ServerProcess
    key_id: str
    runs: list[WrkStats] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name

    def request(self) -> SignedRequest:
        payload = {"KeyId": self.key_id, "Plaintext": base64.b64encode(os.urandom(32)).decode()}
        return signed_request(self.server.endpoint, "TrentService.Encrypt", payload, self.server.access_key_id,
                              self.server.secret_access_key, region=REGION)


def summarize(benchmark: str, store: str, targets: list[Target], args: argparse.Namespace, load_before: float,
              want_rps: float, want_p99_ms: float) -> dict[str, Any]:
    """The medians of each target, `store` over default, default over baseline, and the targets."""
    medians = {t.name: median_stats(t.runs) for t in targets}
    ours, default, base = medians[store], medians["default"], medians["baseline"]
    return {
        "benchmark": benchmark,
        "store": store,
        "storage": "postgresql" if args.storage_url else "sqlite (embedded)",
        "load_average_before": round(load_before, 2),
        "wrk": LoadOptions.from_args(args).summary(),
        "results": {t.name: {"median": medians[t.name], "runs": t.runs} for t in targets},
        f"{store}_over_default": ours["requests_per_sec"] / default["requests_per_sec"],
        "default_over_baseline": default["requests_per_sec"] / base["requests_per_sec"],
        "targets": {
            f"{store}_req_per_sec": {"want": f">= {want_rps:g}", "value": ours["requests_per_sec"],
                                     "met": ours["requests_per_sec"] >= want_rps},
            f"{store}_p99_ms": {"want": f"< {want_p99_ms:g}", "value": ours["latency_ms"]["99"],
                                "met": ours["latency_ms"]["99"] < want_p99_ms},
        },
    }


def print_table(summary: dict[str, Any], legend: str, what: str) -> None:
    """The table; `legend` says what each target is, `what` names the store's key in the targets line."""
    store, wrk = summary["store"], summary["wrk"]
    load = LoadOptions(duration=wrk["duration_s"], warmup=wrk["warmup_s"], connections=wrk["connections"],
                       threads=wrk["threads"], repeat=wrk["runs"])
    print(f"Encrypt of 32 bytes, auditing on, {load.describe()}, {wrk['runs']} measured run(s) per key (medians, "
          f"rounds interleaved), storage: {summary['storage']}, load average before "
          f"{summary['load_average_before']:.2f}")
    print(table_header())
    for name, result in summary["results"].items():
        print(table_row(name, result["median"]))
        print(f"  {name} runs req/s: " + " / ".join(f"{r['requests_per_sec']:,.0f}" for r in result["runs"]))
    print(legend)
    print(f"{store}/default req/s: {summary[f'{store}_over_default']:.2f}; "
          f"default/baseline req/s: {summary['default_over_baseline']:.2f}")
    rps, p99 = summary["targets"][f"{store}_req_per_sec"], summary["targets"][f"{store}_p99_ms"]
    print(f"issue targets: {what} Encrypt {rps['want']}/s {met_text(rps['met'])} ({rps['value']:,.0f}); "
          f"p99 {p99['want']} ms {met_text(p99['met'])} ({p99['value']:.1f} ms)")
