"""Two openkms servers that differ in their settings, loaded AT THE SAME TIME: the throughput ratio.

    python bench/pair.py                                   # OPENKMS_AUDIT=on against OPENKMS_AUDIT=off
    python bench/pair.py --a OPENKMS_AUDIT=off --b OPENKMS_AUDIT=off   # the method's own spread
    python bench/pair.py --a OPENKMS_CACHE_TTL=0 --b "" --rounds 5

On this 2-core machine the speed of the same server drifts by 20-30% between runs ten seconds
apart, which hides effects of a few percent in `audit.py`'s back-to-back runs. Here both servers
(each freshly bootstrapped, embedded SQLite, each with its own symmetric key) are loaded by their
own wrk during the same seconds, so drift slows both alike and the ratio of their req/s is steadier.
The ratio is not the same figure as `audit.py`'s cost: the two servers share the cores, so a server
that needs more CPU per request loses more of it than it would alone. `--a` and `--b` are
comma-separated NAME=VALUE settings for each server's environment. Prints each round and the
median ratio a/b; asserts nothing about timing. Exit status: 0 measured, 1 a run failed, 2 a tool
is missing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._load import (
    REGION,
    BenchError,
    SignedRequest,
    check_replay,
    create_key,
    lift_quotas,
    run_wrk,
    signed_request,
)
from bench._moto import bootstrap_env
from tests.server import ServerProcess


def settings(spec: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
    if any(len(p) != 2 or not p[0].startswith("OPENKMS_") for p in pairs):
        raise SystemExit(f"pair.py: settings must be OPENKMS_NAME=value[,...], not {spec!r}")
    return dict((name.strip(), value) for name, value in pairs)


def encrypt_request(server: ServerProcess, key_id: str | None = None) -> SignedRequest:
    """A signed Encrypt under `key_id` (a new key if None); it replays for five minutes."""
    key_id = key_id or create_key(server.endpoint, server.client())
    request = signed_request(server.endpoint, "TrentService.Encrypt",
                             {"KeyId": key_id, "Plaintext": base64.b64encode(os.urandom(32)).decode()},
                             server.access_key_id, server.secret_access_key, region=REGION)
    check_replay(request, server.endpoint)
    return request


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default="OPENKMS_AUDIT=on", help="settings of server a (OPENKMS_AUDIT=on)")
    parser.add_argument("--b", default="OPENKMS_AUDIT=off", help="settings of server b (OPENKMS_AUDIT=off)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (3)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per round (8)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections per server (64)")
    parser.add_argument("--alternate", action="store_true",
                        help="load one server at a time, a then b (b then a in even rounds), with wrk -t2")
    args = parser.parse_args(argv)
    specs = {"a": settings(args.a), "b": settings(args.b)}
    if shutil.which("wrk") is None:
        print("pair.py: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="openkms-pair-") as tmp:
        servers = {name: ServerProcess(Path(tmp) / name, env=bootstrap_env() | spec) for name, spec in specs.items()}
        try:
            for server in servers.values():
                server.start()
                lift_quotas(server)
            requests = {name: encrypt_request(server) for name, server in servers.items()}
            keys = {name: str(json.loads(request.body)["KeyId"]) for name, request in requests.items()}
            for request in requests.values():
                run_wrk(request, duration=2, connections=args.connections, threads=1)  # warm-up
            how = ("one server at a time, alternating, wrk -t2" if args.alternate
                   else "two servers loaded at once, wrk -t1")
            print(f"Encrypt of 32 bytes, {how} -c{args.connections} -d{args.duration}s each; "
                  f"a: {args.a or '(defaults)'}; b: {args.b or '(defaults)'}")
            ratios = []
            for round_no in range(1, args.rounds + 1):
                rates: dict[str, float] = {}
                errors: list[BaseException] = []

                def load(name: str, rates: dict[str, float] = rates, errors: list[BaseException] = errors,
                         requests: dict[str, SignedRequest] = requests) -> None:
                    try:
                        rates[name] = run_wrk(requests[name], duration=args.duration,
                                              connections=args.connections, threads=1)["requests_per_sec"]
                    except BaseException as exc:  # handed to the main thread
                        errors.append(exc)

                if args.alternate:  # re-signed each round: a long series outlasts the 5-minute window
                    requests = {name: encrypt_request(servers[name], keys[name]) for name in servers}
                    for name in ("a", "b") if round_no % 2 else ("b", "a"):
                        rates[name] = run_wrk(requests[name], duration=args.duration,
                                              connections=args.connections)["requests_per_sec"]
                else:
                    threads = [threading.Thread(target=load, args=(name,)) for name in requests]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                if errors:
                    raise errors[0]
                ratios.append(rates["a"] / rates["b"])
                print(f"round {round_no}: a {rates['a']:,.0f} req/s, b {rates['b']:,.0f} req/s, "
                      f"a/b {ratios[-1]:.3f}", flush=True)
            print(f"median a/b: {statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
        except BenchError as exc:
            print(f"pair.py: {exc}", file=sys.stderr)
            return 1
        finally:
            for server in servers.values():
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
