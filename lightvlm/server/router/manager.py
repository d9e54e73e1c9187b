"""The router: continuous batching around engine.Scheduler, one step at a time on every worker rank.

Loop: take in new requests, aborts and stops; schedule a step; run it on the workers; record the
sampled tokens; send them to detokenization; free what finished requests held (KV slots here, image
references in the visualserver).
"""

import time

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
    ImageRef,
    ReleaseImages,
    ReqError,
    RoomStats,
    StepOutput,
    StopReq,
    TokenOut,
)
from lightvlm.server.router.worker_group import ModelWorkers

logger = get_logger(__name__)


class RouterManager:
    def __init__(self, config: ServerConfig, workers: ModelWorkers):
        self.config = config
        self.workers = workers
        self.num_slots = workers.num_slots()
        self.scheduler = Scheduler(SchedulerConfig(max_total_token_num=self.num_slots,
                                                   batch_max_tokens=config.router.batch_max_tokens,
                                                   running_max_req_size=config.router.running_max_req_size))
        self.eos_token_ids = frozenset(config.model.eos_token_ids)
        self.reqs: dict[int, Req] = {}
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

    def loop(self) -> None:
        while True:
            self.receive(timeout_ms=0 if self.scheduler.has_unfinished else 200)
            batch = self.scheduler.schedule()
            if batch is not None:
                self.run(batch)
            self.send_stats()

    # -- messages in ---------------------------------------------------------------------------

    def receive(self, timeout_ms: int) -> None:
        for message in self.inbox.receive(timeout_ms):
            if isinstance(message, GenerateReq):
                self.add(message)
            elif isinstance(message, AbortReq):
                self.end(message.req_id, ReqStatus.FINISHED_ABORTED, notify="abort")
            elif isinstance(message, StopReq):
                self.end(message.req_id, ReqStatus.FINISHED_STOPPED, notify=None)

    def add(self, message: GenerateReq) -> None:
        images = tuple(ImageRef(i.key, i.offset, i.length) for i in message.images)
        req = Req(message.req_id, list(message.prompt_ids), message.sampling, self.config.router.max_req_total_len,
                  images=images, eos_token_ids=self.eos_token_ids)
        try:
            self.scheduler.add(req)
        except ValueError as e:
            self.to_http.send(ReqError(req.req_id, 400, str(e)))
            self.release_images(req)
            return
        self.reqs[req.req_id] = req
        params = message.sampling
        self.to_detokenization.send(DetokReq(req.req_id, req.num_prompt_tokens, params.skip_special_tokens,
                                             tuple(params.stop_sequences), params.min_new_tokens))

    def end(self, req_id: int, status: ReqStatus, notify: str | None) -> None:
        """Abort (client gone) or stop (a stop string matched): free everything the request holds."""
        req = self.reqs.pop(req_id, None)
        if req is None:
            return
        self.scheduler.finish(req, status)
        self.release_images(req)
        if notify:
            self.to_detokenization.send(TokenOut(req_id, None, finish_reason=notify))

    def release_images(self, req: Req) -> None:
        """One release per distinct image: the visualserver took one reference per key."""
        if req.images and self.to_visual is not None:
            self.to_visual.send(ReleaseImages(tuple(sorted({image.key for image in req.images}))))

    # -- one step ------------------------------------------------------------------------------

    def run(self, batch: Batch) -> None:
        now = time.monotonic()
        for req in batch.new_reqs:
            if req.num_preemptions == 0:
                self.queue_time.observe(now - req.arrival_time)
        try:
            out = self.workers.step(batch.to_step_input())
        except (EOFError, ConnectionError):
            raise  # a worker is gone: the launcher stops the server
        except Exception as e:  # noqa: BLE001 (the step failed as a whole: fail its requests, keep serving)
            logger.exception("model step failed")
            self.num_failed_steps += 1
            out = StepOutput(req_ids=(), token_ids=(), failed=tuple((item.req.req_id, f"{type(e).__name__}: {e}")
                                                                    for item in batch.items))
        self.num_steps += 1
        for req_id, error in out.failed:
            self.fail(req_id, error)
        sampled = dict(zip(out.req_ids, out.token_ids))
        logprobs = dict(zip(out.req_ids, out.logprobs)) if out.logprobs else {}
        finished = {req.req_id for req in self.scheduler.update(batch, sampled)}
        outputs = []
        for req_id, token in sampled.items():
            req = self.reqs.get(req_id)
            if req is None:
                continue
            reason = req.status.finish_reason if req_id in finished else None
            outputs.append(TokenOut(req_id, token, logprobs.get(req_id), reason))
            if reason:
                del self.reqs[req_id]
                self.release_images(req)
        if outputs:
            self.to_detokenization.send(outputs)

    def fail(self, req_id: int, error: str) -> None:
        req = self.reqs.pop(req_id, None)
        if req is None:
            return
        logger.error("request %d failed in the model step: %s", req_id, error)
        self.scheduler.finish(req, ReqStatus.FINISHED_ABORTED)
        self.release_images(req)
        self.to_http.send(ReqError(req_id, 500, f"the model worker failed on this request: {error}"))
        self.to_detokenization.send(TokenOut(req_id, None, finish_reason="abort"))

    def send_stats(self) -> None:
        allocator = self.scheduler.allocator
        values = (("running_requests", len(self.scheduler.running)), ("waiting_requests", len(self.scheduler.waiting)),
                  ("kv_slots_used", allocator.num_used), ("kv_slots_free", allocator.num_free),
                  ("kv_slots_total", self.num_slots), ("steps_total", self.num_steps),
                  ("failed_steps_total", self.num_failed_steps))
        if self.stats_timer.due(values):  # at most ten times a second
            self.to_http.send(RoomStats("router", values, (self.queue_time.snapshot(),)))


def start_router_process(config: ServerConfig, pipe) -> None:
    def start():
        manager = RouterManager(config, ModelWorkers(list(config.runtime.worker_ports)))
        logger.info("router ready: %d KV slots", manager.num_slots)
        return manager.loop

    run_room("router", pipe, config.log_level, start)
