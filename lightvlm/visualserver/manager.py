"""The visualserver: looks every image up in the embedding cache, encodes the misses in batches on the
encoder replicas, and forwards a request to the router once all of its images are ready.

Text-only requests pass straight through, so image work never delays them. Replicas (visual_dp) work
in parallel, one thread each driving its ranks over rpyc; results come back to the loop through an
inproc socket so the loop sleeps only in one poll.
"""

import pickle
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from lightvlm.common import shm
from lightvlm.common.logging import get_logger
from lightvlm.common.messaging import Inbox, Outbox, StatsTimer
from lightvlm.common.process import run_room
from lightvlm.common.rpc import WorkerGroup
from lightvlm.common.stats import LATENCY_BUCKETS, SIZE_BUCKETS, Histogram
from lightvlm.config import ServerConfig
from lightvlm.io_struct import AbortReq, EncodeResult, GenerateReq, ImageItem, ReleaseImages, ReqError, RoomStats
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.models.weight_loader import resolve_dtype
from lightvlm.visualserver.embed_cache import EmbedCache

logger = get_logger(__name__)



@dataclass
class PendingReq:
    req: GenerateReq
    held: list[str] = field(default_factory=list)  # cache keys this request references
    missing: set[str] = field(default_factory=set)  # keys not yet encoded


class VisualManager:
    def __init__(self, config: ServerConfig, row_width: int, dtype):
        self.config = config
        self.row_width, self.dtype = row_width, dtype  # of the embedding rows in the cache
        self.prefix = config.runtime.shm_prefix
        self.segments: dict[str, object] = {}
        self.cache = EmbedCache(config.visual.cache_capacity, config.visual.cache_max_bytes,
                                create=self._create_segment, destroy=self._destroy_segment)
        self.pending: dict[int, PendingReq] = {}
        self.parked: deque[GenerateReq] = deque()  # waiting for room in the cache
        self.jobs: deque[ImageItem] = deque()
        self.job_sources: dict[str, str] = {}  # key -> bytes segment being encoded
        context = zmq.Context.instance()
        self.inbox = Inbox(context, config.runtime.endpoint("visualserver"))
        self.results = context.socket(zmq.PULL)
        self.results_endpoint = f"inproc://encoder-results-{id(self)}"  # unique: the tests build several
        self.results.bind(self.results_endpoint)
        self.to_router = Outbox(context, config.runtime.endpoint("router"))
        self.to_http = Outbox(context, config.runtime.endpoint("httpserver"))
        self.batches: queue.Queue = queue.Queue()
        self.num_replicas = config.visual.dp
        self.busy = 0
        self.stats = {"images_encoded_total": 0, "requests_over_cache_total": 0}
        self.batch_sizes = Histogram("encoder_batch_size", SIZE_BUCKETS)
        self.batch_seconds = Histogram("encoder_batch_seconds", LATENCY_BUCKETS)
        self.stats_timer = StatsTimer()
        tp = config.visual.tp
        for replica in range(self.num_replicas):
            ports = list(config.runtime.visual_ports[replica * tp:(replica + 1) * tp])
            threading.Thread(target=self._drive_replica, args=(ports, context), daemon=True,
                             name=f"replica{replica}").start()

    # -- the loop ------------------------------------------------------------------------------

    def loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inbox.socket, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll(100))
                if self.inbox.socket in ready:
                    for message in self.inbox.receive(timeout_ms=0):
                        self.handle(message)
                while self.results.poll(0):
                    self.finish_batch(*pickle.loads(self.results.recv()))
                self.dispatch()
                self.send_stats()
        finally:
            self.cache.clear()

    def handle(self, message) -> None:
        if isinstance(message, GenerateReq):
            self.admit(message)
        elif isinstance(message, AbortReq):
            self.abort(message.req_id)
        elif isinstance(message, ReleaseImages):
            for key in message.keys:
                self.cache.release(key)
            self.admit_parked()

    # -- requests ------------------------------------------------------------------------------

    def entry_bytes(self, num_rows: int) -> int:
        return shm.embeddings_nbytes(num_rows, self.row_width, self.dtype)

    def admit(self, req: GenerateReq) -> None:
        if not req.images:
            self.to_router.send(req)
            return
        sizes = {item.key: self.entry_bytes(item.num_rows) for item in req.images}
        problem = self.cache.can_ever_hold(sizes)
        if problem:
            self.reject(req, 400, f"this request needs more embedding cache than exists: {problem}")
            return
        if self.parked or not self.try_start(req, sizes):
            self.parked.append(req)

    def try_start(self, req: GenerateReq, sizes: dict[str, int]) -> bool:
        """Reference or create every entry the request needs; all or nothing."""
        pending, created = PendingReq(req), []
        for key, nbytes in sizes.items():
            entry = self.cache.acquire(key)
            if entry is None:
                entry = self.cache.insert(key, nbytes)
                if entry is None:  # the cache is full of entries in use: undo and wait
                    self.undo(req.req_id, pending.held, created)
                    return False
                item = next(i for i in req.images if i.key == key)
                self.jobs.append(item)
                self.job_sources[key] = item.shm_name
                created.append(key)
            pending.held.append(key)
            if not entry.is_ready:
                entry.waiters.add(req.req_id)
                pending.missing.add(key)
        self.unlink_bytes(req)  # bytes of images that were cached or are already being encoded
        self.pending[req.req_id] = pending
        self.forward_if_ready(pending)
        return True

    def undo(self, req_id: int, held: list[str], created: list[str]) -> None:
        for key in held:
            self.cache.release(key)
            self.cache.entries[key].waiters.discard(req_id)
        for key in created:
            self.jobs = deque(job for job in self.jobs if job.key != key)
            self.job_sources.pop(key, None)
            self.cache.remove(key)

    def admit_parked(self) -> None:
        while self.parked:
            req = self.parked[0]
            if not self.try_start(req, {i.key: self.entry_bytes(i.num_rows) for i in req.images}):
                return
            self.parked.popleft()

    def forward_if_ready(self, pending: PendingReq) -> None:
        if not pending.missing:
            del self.pending[pending.req.req_id]
            self.to_router.send(pending.req)

    def abort(self, req_id: int) -> None:
        pending = self.pending.pop(req_id, None)
        if pending is not None:
            self.drop(pending)
            return
        for req in self.parked:
            if req.req_id == req_id:
                self.parked.remove(req)
                self.unlink_bytes(req)
                return
        self.to_router.send(AbortReq(req_id))  # already with the router

    def drop(self, pending: PendingReq) -> None:
        for key in pending.held:
            self.cache.release(key)
            entry = self.cache.entries.get(key)
            if entry is not None:
                entry.waiters.discard(pending.req.req_id)
        self.admit_parked()

    def reject(self, req: GenerateReq, status: int, message: str) -> None:
        self.stats["requests_over_cache_total"] += 1
        self.unlink_bytes(req)
        self.to_http.send(ReqError(req.req_id, status, message))

    def unlink_bytes(self, req: GenerateReq) -> None:
        used = set(self.job_sources.values())
        for item in req.images:
            if item.shm_name not in used:
                shm.unlink(item.shm_name)

    # -- encoding ------------------------------------------------------------------------------

    def dispatch(self) -> None:
        while self.jobs and self.busy < self.num_replicas:
            size = min(len(self.jobs), self.config.visual.infer_batch_size)
            self.batches.put([self.jobs.popleft() for _ in range(size)])
            self.busy += 1

    def _drive_replica(self, ports: list[int], context: zmq.Context) -> None:
        group = WorkerGroup(ports)
        out = context.socket(zmq.PUSH)
        out.connect(self.results_endpoint)
        while True:
            batch = self.batches.get()
            started = time.monotonic()
            try:
                results = group.call("encode", pickle.dumps(batch))[0]
            except Exception as e:  # noqa: BLE001 (the replica failed as a whole: fail the batch)
                logger.exception("encoder replica failed")
                error = f"the vision encoder failed: {type(e).__name__}: {e}"
                results = [EncodeResult(job.key, error) for job in batch]
            out.send(pickle.dumps((batch, results, time.monotonic() - started)))

    def finish_batch(self, batch: list[ImageItem], results: list[EncodeResult], seconds: float) -> None:
        self.busy -= 1
        self.batch_sizes.observe(len(batch))
        self.batch_seconds.observe(seconds)
        for job, result in zip(batch, results):
            shm.unlink(job.shm_name)
            self.job_sources.pop(job.key, None)
            entry = self.cache.entries.get(job.key)
            if entry is None:
                continue
            waiters = [self.pending[r] for r in entry.waiters if r in self.pending]
            entry.waiters.clear()
            if result.error is None:
                self.stats["images_encoded_total"] += 1
                entry.is_ready = True
                for pending in waiters:
                    pending.missing.discard(job.key)
                    self.forward_if_ready(pending)
            else:  # gone first, so that no parked request can take the dead entry
                self.cache.remove(job.key)
                for pending in waiters:
                    del self.pending[pending.req.req_id]
                    self.drop(pending)
                    self.to_http.send(ReqError(pending.req.req_id, result.status, result.error))
        self.admit_parked()

    # -- shared memory -------------------------------------------------------------------------

    def _create_segment(self, key: str, nbytes: int) -> None:
        self.segments[key] = shm.create(shm.embedding_segment(self.prefix, key), nbytes)

    def _destroy_segment(self, key: str) -> None:
        self.segments.pop(key).close()
        shm.unlink(shm.embedding_segment(self.prefix, key))

    def send_stats(self) -> None:
        cache = self.cache
        values = (("embed_cache_hits_total", cache.hits), ("embed_cache_misses_total", cache.misses),
                  ("embed_cache_entries", len(cache)), ("embed_cache_bytes", cache.nbytes),
                  ("embed_cache_evictions_total", cache.evictions),
                  ("embed_cache_held_entries", sum(1 for e in cache.entries.values() if e.refs)),
                  ("visual_pending_requests", len(self.pending)),
                  ("visual_parked_requests", len(self.parked)), *sorted(self.stats.items()))
        if self.stats_timer.due(values):
            histograms = (self.batch_sizes.snapshot(), self.batch_seconds.snapshot())
            self.to_http.send(RoomStats("visualserver", values, histograms))


def start_visual_process(config: ServerConfig, pipe) -> None:
    def start():
        ckpt = LoadedCheckpoint.open(config.model.model_dir)
        dtype = resolve_dtype(config.model.data_type, config.model.device, config.model.model_dir)
        return VisualManager(config, ckpt.embedding_width, dtype).loop

    run_room("visualserver", pipe, config.log_level, start)
