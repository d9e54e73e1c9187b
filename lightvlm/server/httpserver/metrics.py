"""Prometheus metrics (prometheus-client): the httpserver's own request timings, the counters and gauges
every other room reports in its RoomStats (exported under the same names, `lightvlm_` first), and
the same facts under vLLM's names (`vllm:...`, labelled `model_name`), so that dashboards built for
vLLM work unchanged. Plus the process collector (CPU, memory, open files of the httpserver)."""

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from lightvlm.common.stats import LATENCY_BUCKETS

disable_created_metrics()  # no *_created series, as vLLM: dashboards do not read them

# Room values whose name ends in _total but which are capacities, not counts: gauges.
CAPACITIES = frozenset({"kv_slots_total"})
# Room stats that vLLM exports too: our name -> vLLM's (counters without their _total, as prometheus-client wants)
VLLM_NAMES = {
    "running_requests": "vllm:num_requests_running",
    "waiting_requests": "vllm:num_requests_waiting",
    "preemptions_total": "vllm:num_preemptions",
    "queue_time_seconds": "vllm:request_queue_time_seconds",
    "request_prefill_time_seconds": "vllm:request_prefill_time_seconds",
    "request_decode_time_seconds": "vllm:request_decode_time_seconds",
}


def is_counter(name: str) -> bool:
    return name.endswith("_total") and name not in CAPACITIES


class RoomStatsCollector:
    def __init__(self, source, model_name: str):
        self.source = source  # () -> {room: RoomStats}
        self.model_name = model_name

    def collect(self):
        for room, stats in sorted(self.source().items()):
            for name, bounds, cumulative, total in stats.histograms:
                buckets = [(str(float(b)), c) for b, c in zip(bounds, cumulative)] + [("+Inf", cumulative[-1])]
                yield HistogramMetricFamily(f"lightvlm_{name}", f"{name} ({room})", buckets=buckets, sum_value=total)
                if name in VLLM_NAMES:
                    family = HistogramMetricFamily(VLLM_NAMES[name], f"{name} ({room})", labels=["model_name"])
                    family.add_metric([self.model_name], buckets, total)
                    yield family
            values = dict(stats.values)
            for name, value in sorted(values.items()):
                yield self.family(f"lightvlm_{name}", name, room, value, [], [])
                if name in VLLM_NAMES:
                    yield self.family(VLLM_NAMES[name], name, room, value, ["model_name"], [self.model_name])
            if "kv_slots_used" in values and values.get("kv_slots_total"):
                family = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV slots in use, as a fraction of all",
                                           labels=["model_name"])
                family.add_metric([self.model_name], values["kv_slots_used"] / values["kv_slots_total"])
                yield family

    @staticmethod
    def family(metric: str, name: str, room: str, value: float, labels: list[str], label_values: list[str]):
        if is_counter(name):
            family = CounterMetricFamily(metric.removesuffix("_total"), f"{name} ({room})", labels=labels)
        else:
            family = GaugeMetricFamily(metric, f"{name} ({room})", labels=labels)
        family.add_metric(label_values, value)
        return family


class Metrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
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
        model = ["model_name"]
        self.vllm_prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens", model, registry=r)
        self.vllm_generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", model, registry=r)
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Submission to first token", model,
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.vllm_itl = Histogram("vllm:inter_token_latency_seconds", "Time between two output tokens", model,
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "Submission to last token", model,
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.vllm_success = Counter("vllm:request_success", "Requests that finished, by reason",
                                    ["model_name", "finished_reason"], registry=r)
        self.videos_rejected = Counter("lightvlm_videos_rejected", "Videos refused at the edge, by reason",
                                       ["reason"], registry=r)
        self.num_output_tokens: dict[int, int] = {}

    def watch_rooms(self, source) -> None:
        self.registry.register(RoomStatsCollector(source, self.model_name))

    def token(self, state) -> None:
        now = time.monotonic()
        if state.first_token_at is None:
            state.first_token_at = now
            self.ttft.observe(now - state.submitted_at)
            self.vllm_ttft.labels(self.model_name).observe(now - state.submitted_at)
            self.vllm_prompt_tokens.labels(self.model_name).inc(state.prompt_tokens)
        else:
            self.vllm_itl.labels(self.model_name).observe(now - state.last_token_at)
        state.last_token_at = now
        self.vllm_generation_tokens.labels(self.model_name).inc()
        self.num_output_tokens[state.req_id] = self.num_output_tokens.get(state.req_id, 0) + 1

    def finish(self, state, status: str) -> None:
        self.requests.labels(status=status).inc()
        self.requests_in_flight.dec()
        if status in ("stop", "length"):
            self.vllm_success.labels(self.model_name, status).inc()
        count = self.num_output_tokens.pop(state.req_id, 0)
        if state.first_token_at is not None:
            self.e2e.observe(state.last_token_at - state.submitted_at)
            self.vllm_e2e.labels(self.model_name).observe(state.last_token_at - state.submitted_at)
            if count > 1:
                self.tpot.observe((state.last_token_at - state.first_token_at) / (count - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
