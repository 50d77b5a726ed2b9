"""Prometheus metrics (CONTRACT §7): fixed names, bounded labels, one registry per app.

Label values come only from the configuration (model ids, upstream URLs) and from small fixed
sets (status codes, limit kinds, error reasons); a model the config does not know is counted
under `model="unknown"`, never under the client's string. Children are cached so that the
hot path does no label lookups.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.metrics import MetricWrapperBase

UNKNOWN_MODEL = "unknown"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics:
    def __init__(self, models: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.models = frozenset(models)
        r = self.registry
        self.requests = Counter("liutong_requests", "Requests answered, by model and HTTP status.",
                                ["model", "status"], registry=r)  # fmt: skip
        self.duration = Histogram("liutong_request_duration_seconds", "Time from request to last byte.",
                                  ["model", "stream"], buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.ttft = Histogram("liutong_upstream_ttft_seconds", "Time to the first upstream byte or event.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.overhead = Histogram("liutong_gateway_overhead_seconds",
                                  "Time spent in the gateway, upstream time excluded.",
                                  buckets=_OVERHEAD_BUCKETS, registry=r)  # fmt: skip
        self.tokens = Counter("liutong_tokens", "Tokens in usage records, by model and kind.",
                              ["model", "kind"], registry=r)  # fmt: skip
        self.ratelimited = Counter("liutong_ratelimited", "Requests refused by a rate limit.",
                                   ["model", "limit"], registry=r)  # fmt: skip
        self.ratelimited_scope = Counter("liutong_ratelimited_by_scope", "Requests refused, by limit scope.",
                                         ["scope", "limit"], registry=r)  # fmt: skip
        self.inflight = Gauge("liutong_inflight_requests", "Requests being served.", ["model"], registry=r,
                              multiprocess_mode="livesum")  # fmt: skip
        self.upstream_errors = Counter("liutong_upstream_errors", "Upstream failures, by reason.",
                                       ["model", "reason"], registry=r)  # fmt: skip
        self.store_up = Gauge("liutong_store_up", "1 while the shared store answers (on a Cluster: every primary).", registry=r,
                              multiprocess_mode="livemin")  # fmt: skip
        self.store_degraded = Gauge("liutong_store_degraded",
                                    "1 while serving under fail_open during a store outage.", registry=r,
                                    multiprocess_mode="livemax")  # fmt: skip
        self.upstream_healthy = Gauge("liutong_upstream_healthy", "1 while an upstream is in rotation.",
                                      ["model", "upstream"], registry=r, multiprocess_mode="livemin")  # fmt: skip
        self.upstream_load_source = Gauge("liutong_upstream_load_source",
                                          "1 while routing uses the upstream's scraped load, 0 for local load.",
                                          ["model", "upstream"], registry=r, multiprocess_mode="livemin")  # fmt: skip
        self.usage_pending = Gauge("liutong_usage_spool_records",
                                   "Usage records waiting to be written to the store.", registry=r,
                                   multiprocess_mode="livesum")  # fmt: skip
        self.draining = Gauge("liutong_draining", "1 while the gateway drains before exit.", registry=r,
                              multiprocess_mode="livemax")  # fmt: skip
        self._requests: dict[tuple[str, int], Counter] = {}
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        self._duration: dict[tuple[str, bool], Histogram] = {}
        for model in self.models:
            for kind in ("prompt", "completion"):
                self.tokens.labels(model, kind)
            self.inflight.labels(model)

    def set_models(self, models: Iterable[str]) -> None:
        self.models = frozenset(models)
        for model in self.models:
            for kind in ("prompt", "completion"):
                self.tokens.labels(model, kind)
            self.inflight.labels(model)

    def label(self, model: str) -> str:
        return model if model in self.models else UNKNOWN_MODEL

    def child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        """`metric.labels(*labels)`, cached: `labels()` validates and locks on every call, and the
        request path needs four children per request."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def request_done(self, model: str, status: int, stream: bool, seconds: float) -> None:
        model = self.label(model)
        counter = self._requests.get((model, status))
        if counter is None:
            counter = self._requests[(model, status)] = self.requests.labels(model, str(status))
        counter.inc()
        hist = self._duration.get((model, stream))
        if hist is None:
            hist = self._duration[(model, stream)] = self.duration.labels(model, "true" if stream else "false")
        hist.observe(seconds)

    def exposition(self) -> bytes:
        """This process's metrics, or every worker's summed in `serve --workers` (multiprocess mode)."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry)
