"""A serving node's metrics, in the Prometheus text format (prometheus_client).

Served on a port of their own (`--metrics-listen HOST:PORT`, no authentication: bind it where only
the monitoring system reaches) and/or as `GET /metrics` on the API listener behind a bearer token
(`OPENKMS_METRICS_TOKEN`); without either, there is no /metrics.

What is counted: API calls by API, operation and outcome (`ok` or the AWS error code), their
latency, throttled calls, audit batches (records per commit, commit latency), the hits and misses
of the node's caches, custom key stores by type and connection state, XKS proxies by health. No
label ever holds a key id, an account, a principal or a value: an operator's view of the node,
never a tenant's data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .cache import TTLCache

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, node: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("openkms_requests", "API calls answered, by API, operation and outcome "
                                "(ok, or the AWS error code)", ["api", "operation", "code"], registry=self.registry)
        self.latency = Histogram("openkms_request_duration_seconds", "Time to answer an API call (the audit "
                                 "record's commit excluded)", ["api", "operation"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.throttled = Counter("openkms_throttled_requests", "API calls answered ThrottlingException", ["api"],
                                 registry=self.registry)
        self.audit_batch = Histogram("openkms_audit_batch_records", "Audit records committed together",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.audit_commit = Histogram("openkms_audit_commit_seconds", "From an audit batch's hand-over to the "
                                      "writer to its commit", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_NodeCollector(node))
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def observe(self, api: str, operation: str, code: str, seconds: float) -> None:
        children = self._children.get((api, operation, code))
        if children is None:
            children = self._children[(api, operation, code)] = (
                self.requests.labels(api, operation, code), self.latency.labels(api, operation))
        children[0].inc()
        children[1].observe(seconds)
        if code == "ThrottlingException":
            self.throttled.labels(api).inc()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class _NodeCollector(Collector):
    """What is read at each scrape: the caches' counters, the custom key stores."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[Any]:
        hits = CounterMetricFamily("openkms_cache_hits", "Lookups a cache of the node answered", labels=["cache"])
        misses = CounterMetricFamily("openkms_cache_misses", "Lookups a cache of the node sent to the store",
                                     labels=["cache"])
        totals: dict[str, list[int]] = {}
        for cache in list(TTLCache.named):
            entry = totals.setdefault(cache.name, [0, 0])
            entry[0] += cache.hits
            entry[1] += cache.misses
        for name, (hit, miss) in sorted(totals.items()):
            hits.add_metric([name], hit)
            misses.add_metric([name], miss)
        yield hits
        yield misses
        stores = GaugeMetricFamily("openkms_custom_key_stores", "Custom key stores, by type and connection state",
                                   labels=["type", "state"])
        try:
            with self.node.store.begin() as tx:
                counts = tx.key_stores.counts()
        except Exception:  # the store is down: /ready says so; the rest still scrapes
            counts = {}
        for (kind, state), n in sorted(counts.items()):
            stores.add_metric([kind, state], n)
        yield stores
        health = GaugeMetricFamily("openkms_xks_proxies", "Connected external key stores by their proxy's last "
                                   "health (as this node last learnt it)", labels=["health"])
        by_health: dict[str, int] = {}
        for status in self.node.service.keystores.xks_health_statuses():
            by_health[status] = by_health.get(status, 0) + 1
        for status, n in sorted(by_health.items()):
            health.add_metric([status], n)
        yield health
