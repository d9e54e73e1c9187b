"""The router: continuous batching around engine.Scheduler, one step at a time on every worker rank.

Loop: take in new requests, aborts and stops; schedule a step and start it on the workers; then,
while they run it, record the previous step's sampled tokens, send them to detokenization and free
what finished requests held (KV slots here, image references in the visualserver). The workers never
wait for the router: the next step is already queued when one ends, its decode inputs named as
PENDING_TOKEN (each rank knows what it sampled). The price is one wasted row for a request that
stops on EOS or a stop string, whose next step was already scheduled.
"""

import time
from collections.abc import Callable
from dataclasses import replace

import zmq

from lightvlm.common.logging import get_logger
from lightvlm.common.messaging import Inbox, Outbox, StatsTimer
from lightvlm.common.process import run_room
from lightvlm.common.stats import LATENCY_BUCKETS, Histogram
from lightvlm.config import ServerConfig
from lightvlm.engine.req import Req, ReqStatus
from lightvlm.engine.scheduler import Batch, Scheduler, SchedulerConfig
from lightvlm.io_struct import (
    AbortReq,
    DetokReq,
    GenerateReq,
    ReleaseImages,
    ReqError,
    RoomStats,
    StepOutput,
    StopReq,
    TokenOut,
)
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.workers.group import ModelWorkers

logger = get_logger(__name__)


class RouterManager:
    def __init__(self, config: ServerConfig, ckpt: LoadedCheckpoint, workers: ModelWorkers):
        self.config = config
        self.workers = workers
        self.scheduler = Scheduler(SchedulerConfig(num_slots=workers.num_slots(),
                                                   batch_max_tokens=config.router.batch_max_tokens,
                                                   running_max_req_size=config.router.running_max_req_size,
                                                   use_prefix_cache=config.router.use_prefix_cache))
        self.eos_token_ids = frozenset(ckpt.eos_token_ids)
        self.max_len = ckpt.context_limit(config.router.max_req_total_len)
        context = zmq.Context.instance()
        runtime = config.runtime
        self.inbox = Inbox(context, runtime.endpoint("router"))
        self.to_detokenization = Outbox(context, runtime.endpoint("detokenization"))
        self.to_http = Outbox(context, runtime.endpoint("httpserver"))
        self.to_visual = Outbox(context, runtime.endpoint("visualserver")) if config.visual.enabled else None
        self.stats_timer = StatsTimer()
        self.num_steps = 0
        self.num_failed_steps = 0
        self.queue_time = Histogram("queue_time_seconds", LATENCY_BUCKETS)  # arrival -> first scheduled
        # first scheduled -> first token, and first token -> finished (vLLM's prefill and decode times)
        self.prefill_time = Histogram("request_prefill_time_seconds", LATENCY_BUCKETS)
        self.decode_time = Histogram("request_decode_time_seconds", LATENCY_BUCKETS)
        self.timings: dict[int, list[float]] = {}  # req id -> [first scheduled, first token] (monotonic)
        self.num_done_preemptions = 0  # preemptions of requests that have ended (live ones count in their Req)
        # prompt logprobs by position, until the request's first token carries them to the client
        self.prompt_logprobs: dict[int, dict[int, object]] = {}

    def loop(self) -> None:
        in_flight = None  # the step the workers run now, and how to wait for its output
        while True:
            self.receive(timeout_ms=0 if self.scheduler.has_unfinished or in_flight else 200)
            batch = self.scheduler.schedule()
            launched = self.launch(batch) if batch is not None else None
            if in_flight is not None:
                self.finish_step(*in_flight)
            in_flight = launched
            self.send_stats()

    # -- messages in ---------------------------------------------------------------------------

    def receive(self, timeout_ms: int) -> None:
        for message in self.inbox.receive(timeout_ms):
            if isinstance(message, GenerateReq):
                self.add(message)
            elif isinstance(message, AbortReq) and (req := self.scheduler.reqs.get(message.req_id)):
                self.retire(req, ReqStatus.FINISHED_ABORTED, tell_detokenization=True)
            elif isinstance(message, StopReq) and (req := self.scheduler.reqs.get(message.req_id)):
                self.retire(req, ReqStatus.FINISHED_STOPPED)  # detokenization ended it itself

    def add(self, message: GenerateReq) -> None:
        images = tuple(replace(item, shm_name="", num_bytes=0) for item in message.images)  # bytes stay behind
        req = Req(message.req_id, list(message.prompt_ids), message.sampling, self.max_len,
                  images=images, eos_token_ids=self.eos_token_ids)
        try:
            self.scheduler.add(req)
        except ValueError as e:
            self.to_http.send(ReqError(req.req_id, 400, str(e)))
            self.release_images(req)
            return
        params = message.sampling
        if params.prompt_logprobs is not None:
            self.prompt_logprobs[req.req_id] = {}
        self.to_detokenization.send(DetokReq(req.req_id, params.skip_special_tokens,
                                             tuple(params.stop_sequences), params.min_new_tokens))

    def retire(self, req: Req, status: ReqStatus, tell_detokenization: bool = False, error: str | None = None):
        """End a request from outside the step (aborted, stopped, failed): free its KV slots and images."""
        self.scheduler.finish(req, status)
        self.release_images(req)
        self.forget(req)
        if error is not None:  # through detokenization, behind the tokens it has not yet passed on
            logger.error("request %d failed in the model step: %s", req.req_id, error)
            self.to_detokenization.send(ReqError(req.req_id, 500, f"the model worker failed on this request: {error}"))
        elif tell_detokenization:
            self.to_detokenization.send(TokenOut(req.req_id, None, finish_reason="abort"))

    def forget(self, req: Req) -> None:
        """A request ended: its timings go into the histograms, its bookkeeping away."""
        self.num_done_preemptions += req.num_preemptions
        self.prompt_logprobs.pop(req.req_id, None)
        timing = self.timings.pop(req.req_id, None)
        if timing is not None and len(timing) == 2:
            self.decode_time.observe(time.monotonic() - timing[1])

    def release_images(self, req: Req) -> None:
        """One release per distinct image: the visualserver took one reference per key."""
        if req.images and self.to_visual is not None:
            self.to_visual.send(ReleaseImages(tuple(sorted({image.key for image in req.images}))))

    # -- one step ------------------------------------------------------------------------------

    def launch(self, batch: Batch) -> tuple[Batch, Callable[[], StepOutput]]:
        now = time.monotonic()
        for req in batch.new_reqs:
            if req.num_preemptions == 0:
                self.queue_time.observe(now - req.arrival_time)
                self.timings[req.req_id] = [now]
        return batch, self.workers.launch(batch.to_step_input())

    def finish_step(self, batch: Batch, wait: Callable[[], StepOutput]) -> None:
        try:
            out = wait()
        except (EOFError, ConnectionError):
            raise  # a worker is gone: the launcher stops the server
        except Exception as e:  # noqa: BLE001 (the step failed as a whole: fail its requests, keep serving)
            logger.exception("model step failed")
            self.num_failed_steps += 1
            out = StepOutput(req_ids=(), token_ids=(), failed=tuple((item.req.req_id, f"{type(e).__name__}: {e}")
                                                                    for item in batch.items))
        self.num_steps += 1
        for req_id, error in out.failed:
            if req := self.scheduler.reqs.get(req_id):
                self.retire(req, ReqStatus.FINISHED_ABORTED, tell_detokenization=True, error=error)
        sampled = dict(zip(out.req_ids, out.token_ids))
        logprobs = dict(zip(out.req_ids, out.logprobs)) if out.logprobs else {}
        for req_id, first, values in out.prompt_logprobs:
            if (known := self.prompt_logprobs.get(req_id)) is not None:
                known.update(enumerate(values, start=first))
        finished = {req.req_id: req for req in self.scheduler.update(batch, sampled)}
        for req_id in out.finished:  # the output grammar is complete: the token just sampled was the last
            if req := self.scheduler.reqs.get(req_id):
                self.scheduler.finish(req, ReqStatus.FINISHED_STOPPED)
                finished[req_id] = req
        outputs = []
        for req_id, token in sampled.items():
            req = finished.get(req_id) or self.scheduler.reqs.get(req_id)
            if req is None:  # ended before this token (failed, aborted, or stopped by an earlier one)
                continue
            outputs.append(TokenOut(req_id, token, logprobs.get(req_id), req.status.finish_reason,
                                    self.first_token(req), req.num_cached_tokens))
        for req in finished.values():
            self.release_images(req)
            self.forget(req)
        if outputs:
            self.to_detokenization.send(outputs)

    def first_token(self, req: Req) -> tuple | None:
        """On a request's first token: note the time, and hand over its prompt logprobs (if it asked)."""
        timing = self.timings.get(req.req_id)
        if timing is not None and len(timing) == 1:
            timing.append(time.monotonic())
            self.prefill_time.observe(timing[1] - timing[0])
        known = self.prompt_logprobs.pop(req.req_id, None)
        if known is None:
            return None
        return tuple(known.get(i) for i in range(req.num_prompt_tokens))

    def send_stats(self) -> None:
        allocator, kv = self.scheduler.allocator, self.scheduler.kv
        live_preemptions = sum(req.num_preemptions for req in self.scheduler.reqs.values())
        reclaimable = kv.num_evictable if kv else 0  # cached prefixes no request references
        values = (("running_requests", len(self.scheduler.running)), ("waiting_requests", len(self.scheduler.waiting)),
                  ("kv_slots_used", allocator.num_used - reclaimable),
                  ("kv_slots_free", allocator.num_free + reclaimable),
                  *self.scheduler.cache_stats(),
                  ("kv_slots_total", allocator.num_slots), ("steps_total", self.num_steps),
                  ("failed_steps_total", self.num_failed_steps),
                  ("preemptions_total", self.num_done_preemptions + live_preemptions))
        if self.stats_timer.due(values):  # at most ten times a second
            histograms = (self.queue_time.snapshot(), self.prefill_time.snapshot(), self.decode_time.snapshot())
            self.to_http.send(RoomStats("router", values, histograms))


def start_router_process(config: ServerConfig, pipe) -> None:
    def start():
        manager = RouterManager(config, LoadedCheckpoint.open(config.model.model_dir),
                                ModelWorkers(list(config.runtime.worker_ports)))
        logger.info("router ready: %d KV slots", manager.scheduler.allocator.num_slots)
        return manager.loop

    run_room("router", pipe, config.log_level, start)
