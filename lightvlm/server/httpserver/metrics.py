"""Prometheus metrics (prometheus-client): the httpserver's own request timings, plus the counters and
gauges every other room reports in its RoomStats (exported under the same names, `lightvlm_` first)."""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from lightvlm.common.stats import LATENCY_BUCKETS


class RoomStatsCollector:
    def __init__(self, source):
        self.source = source  # () -> {room: RoomStats}

    def collect(self):
        for room, stats in sorted(self.source().items()):
            for name, bounds, cumulative, total in stats.histograms:
                buckets = [(str(float(b)), c) for b, c in zip(bounds, cumulative)] + [("+Inf", cumulative[-1])]
                yield HistogramMetricFamily(f"lightvlm_{name}", f"{name} ({room})", buckets=buckets, sum_value=total)
            for name, value in sorted(stats.values):
                if name.endswith("_total"):
                    family = CounterMetricFamily(f"lightvlm_{name.removesuffix('_total')}", f"{name} ({room})")
                else:
                    family = GaugeMetricFamily(f"lightvlm_{name}", f"{name} ({room})")
                family.add_metric([], value)
                yield family


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lightvlm_requests", "Finished requests by status", ["status"], registry=r)
        self.requests_in_flight = Gauge("lightvlm_requests_in_flight", "Requests submitted and not finished",
                                        registry=r)
        self.ttft = Histogram("lightvlm_time_to_first_token_seconds", "Submission to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("lightvlm_time_per_output_token_seconds", "Mean time between output tokens",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lightvlm_e2e_request_latency_seconds", "Submission to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.images_rejected = Counter("lightvlm_images_rejected", "Images refused at the edge, by reason",
                                       ["reason"], registry=r)
        self.videos_rejected = Counter("lightvlm_videos_rejected", "Videos refused at the edge, by reason",
                                       ["reason"], registry=r)
        self.num_output_tokens: dict[int, int] = {}

    def watch_rooms(self, source) -> None:
        self.registry.register(RoomStatsCollector(source))

    def token(self, state) -> None:
        now = time.monotonic()
        if state.first_token_at is None:
            state.first_token_at = now
            self.ttft.observe(now - state.submitted_at)
        state.last_token_at = now
        self.num_output_tokens[state.req_id] = self.num_output_tokens.get(state.req_id, 0) + 1

    def finish(self, state, status: str) -> None:
        self.requests.labels(status=status).inc()
        self.requests_in_flight.dec()
        count = self.num_output_tokens.pop(state.req_id, 0)
        if state.first_token_at is not None:
            self.e2e.observe(state.last_token_at - state.submitted_at)
            if count > 1:
                self.tpot.observe((state.last_token_at - state.first_token_at) / (count - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
