"""Continuous token-level batching: which requests compute how many tokens in the next step.

Policy only: pure Python, no torch, no sockets. There is no prefill or decode phase, only tokens
still to compute: a running request asks for its remaining prompt (in chunks that fit the step's
token budget) or for its one newest token. Waiting requests join between steps when the batch's
predicted peak KV use still fits; under pressure the newest running request is preempted (its KV
freed, recomputed later) rather than anything failing. With the prefix cache (engine/kv_manager.py)
a request starts from the longest cached prefix of its prompt, and what it computed goes into the
cache once its step's output is recorded.

A scheduled step counts as computed at once, and each token it samples gets a held place in the
request's outputs (PENDING_TOKEN), so the next step can be scheduled before this one's tokens are
back: the router overlaps its own work with the workers'. `update` fills the places in step order.
"""

from collections import deque
from dataclasses import dataclass, field

from lightvlm.engine.kv_manager import KVManager, cache_keys
from lightvlm.engine.req import Req, ReqStatus
from lightvlm.engine.token_allocator import TokenAllocator
from lightvlm.io_struct import PENDING_TOKEN, ReqInit, StepInput


@dataclass(frozen=True)
class SchedulerConfig:
    num_slots: int  # KV slots in the pool
    batch_max_tokens: int  # tokens computed per step, prefill chunks included
    running_max_req_size: int  # requests in the running batch
    use_prefix_cache: bool = False  # share the KV of equal prefixes (engine/kv_manager.py)


@dataclass
class ScheduledReq:
    req: Req
    start: int  # first token computed in this step
    num_new_tokens: int
    new_slots: list[int]
    samples: bool  # the step reaches the request's newest token, so a next token is sampled


@dataclass
class Batch:
    items: list[ScheduledReq] = field(default_factory=list)
    new_reqs: list[Req] = field(default_factory=list)  # scheduled for the first time (or again)
    released: list[int] = field(default_factory=list)  # finished or preempted since the last step

    def to_step_input(self) -> StepInput:
        input_ids, slots = [], []
        for item in self.items:
            input_ids.extend(item.req.token_at(i) for i in range(item.start, item.start + item.num_new_tokens))
            slots.extend(item.new_slots)
        return StepInput(
            req_ids=tuple(item.req.req_id for item in self.items),
            num_new_tokens=tuple(item.num_new_tokens for item in self.items),
            input_ids=tuple(input_ids),
            new_slots=tuple(slots),
            samples=tuple(item.samples for item in self.items),
            new_reqs=tuple(prepare_req_init(r) for r in self.new_reqs),
            released=tuple(self.released),
        )


def prepare_req_init(req: Req) -> ReqInit:
    k = req.num_cached_tokens
    return ReqInit(req.req_id, req.num_prompt_tokens, req.sampling, tuple(sorted(req.eos_token_ids)), req.images,
                   cached_slots=tuple(req.kv_slots[:k]),
                   cached_ids=tuple(req.prompt_ids[:k]) if k and req.sampling.has_penalties else ())


def predicted_peak(usages: list[tuple[int, int]]) -> int:
    """Peak KV use of requests given as (slots held now, slots still to grow).

    Every request grows one slot per step until it is done, then frees everything. Sorted by
    remaining growth r, just before the request with growth r_k finishes, every request with r >= r_k
    is alive and holds its current slots plus r_k: the peak is the largest of those sums.
    """
    peak, alive_held = 0, 0
    by_growth = sorted(usages, key=lambda u: u[1], reverse=True)
    for count, (held, growth) in enumerate(by_growth, start=1):
        alive_held += held
        peak = max(peak, alive_held + count * growth)
    return peak


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: TokenAllocator | None = None):
        self.config = config
        self.allocator = allocator or TokenAllocator(config.num_slots)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.reqs: dict[int, Req] = {}  # every unfinished request, by id
        self._released: list[int] = []
        self._sent: set[int] = set()  # requests the workers hold state for
        self.kv = KVManager(self.allocator) if config.use_prefix_cache else None
        self.num_prompt_tokens_scheduled = 0  # prompt tokens admitted (cached or computed)
        self.num_prompt_tokens_cached = 0  # of those, found in the prefix cache

    # -- requests in and out -------------------------------------------------------------------

    def add(self, req: Req) -> None:
        if req.max_kv_tokens > self.config.num_slots:
            raise ValueError(f"request {req.req_id} needs up to {req.max_kv_tokens} KV slots but the pool "
                             f"has {self.config.num_slots}")
        self.waiting.append(req)
        self.reqs[req.req_id] = req

    def abort(self, req_id: int) -> Req | None:
        req = self.reqs.get(req_id)
        if req is not None:
            self.finish(req, ReqStatus.FINISHED_ABORTED)
        return req

    def finish(self, req: Req, status: ReqStatus) -> None:
        """End a request from outside the step (a stop string matched, an error)."""
        req.finish(status)
        self._remove(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _remove(self, req: Req) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.reqs.pop(req.req_id, None)
        self._free(req)

    def _free(self, req: Req) -> None:
        if req.cache_handle is not None:
            self.kv.release(req.cache_handle)
            req.cache_handle = None
        if own := req.own_slots:
            self.allocator.free(own)
        req.kv_slots, req.num_in_tree, req.dup_slots = [], 0, []
        if req.req_id in self._sent:
            self._sent.discard(req.req_id)
            self._released.append(req.req_id)

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> Batch | None:
        """Pick the next step's work and allocate its KV slots. None when there is nothing to do."""
        batch = Batch()
        budget = self.config.batch_max_tokens
        for req in list(self.running):
            if budget == 0:
                break
            if req not in self.running:  # preempted to make room for an older request
                continue
            n = min(req.num_tokens_to_compute, budget)
            if n and self._make_room(n, req):
                batch.items.append(self._take(req, n))
                budget -= n
        while self.waiting and budget and len(self.running) < self.config.running_max_req_size:
            req = self.waiting[0]
            self._match(req)
            n = min(req.num_tokens_to_compute, budget)
            if not self._fits(req) or not self._can_alloc(n):
                self._unmatch(req)
                break  # first come, first served: later arrivals wait behind it
            self.waiting.popleft()
            self.num_prompt_tokens_scheduled += req.num_prompt_tokens
            self.num_prompt_tokens_cached += req.num_cached_tokens
            req.status = ReqStatus.RUNNING
            self.running.append(req)
            batch.items.append(self._take(req, n))
            budget -= n
        for item in batch.items:
            if item.req.req_id not in self._sent:
                self._sent.add(item.req.req_id)
                batch.new_reqs.append(item.req)
        if not batch.items:
            return None  # what was released waits for the next step (taken now, it would be lost)
        batch.released = self.take_released()
        return batch

    def take_released(self) -> list[int]:
        """Requests the workers should forget, handed out once (normally with the next step)."""
        released, self._released = self._released, []
        return released

    def _can_alloc(self, n: int) -> bool:
        return self.kv.can_alloc(n) if self.kv else self.allocator.can_alloc(n)

    def _match(self, req: Req) -> None:
        """Take the longest cached prefix of the prompt but its last token (which must be computed for
        its logits); none when the request wants prompt logprobs (they need every prompt row)."""
        if self.kv is None or req.sampling.prompt_logprobs is not None:
            return
        k, slots, handle = self.kv.match(cache_keys(req.prompt_ids[:-1]))
        req.cache_handle, req.kv_slots, req.num_in_tree = handle, slots, k
        req.num_cached_tokens = req.num_computed_tokens = k

    def _unmatch(self, req: Req) -> None:
        self._free(req)
        req.num_cached_tokens = req.num_computed_tokens = 0

    def _cache(self, req: Req, num_tokens: int) -> None:
        """Put the request's first num_tokens (their KV written, or being written by a step already
        scheduled) in the tree, so that requests scheduled from now on can share them."""
        if num_tokens <= req.num_in_tree:
            return
        ids = [req.token_at(i) for i in range(num_tokens)]
        assert PENDING_TOKEN not in ids
        handle, dups = self.kv.insert(cache_keys(ids), req.kv_slots[:num_tokens])
        if req.cache_handle is not None:
            self.kv.release(req.cache_handle)
        req.cache_handle, req.num_in_tree = handle, num_tokens
        req.dup_slots.extend(s for s in dups if s not in req.dup_slots)

    def cache_stats(self) -> tuple[tuple[str, float], ...]:
        """The prefix cache's counters for /metrics (hit rate = cached / prompt tokens)."""
        if self.kv is None:
            return ()
        return (("prompt_tokens_admitted_total", self.num_prompt_tokens_scheduled),
                ("prompt_tokens_cached_total", self.num_prompt_tokens_cached),
                ("prefix_cache_tokens", self.kv.num_tree_slots),
                ("prefix_cache_evicted_tokens_total", self.kv.num_evicted_tokens),
                ("prefix_cache_hit_rate", self.num_prompt_tokens_cached / max(1, self.num_prompt_tokens_scheduled)))

    def check_integrity(self) -> None:
        """Every KV slot is free, in the prefix cache, or owned by exactly one running request."""
        if self.kv is None:
            self.allocator.check_integrity()
            owned = [s for r in self.running for s in r.kv_slots]
            assert len(owned) == len(set(owned)) == self.allocator.num_used, "KV slots leaked or shared"
        else:
            self.kv.check_integrity(r.own_slots for r in self.running)

    def _take(self, req: Req, n: int) -> ScheduledReq:
        slots = self.kv.alloc(n) if self.kv else self.allocator.alloc(n)
        req.kv_slots.extend(slots)  # owned from now on, so an abort frees them too
        item = ScheduledReq(req, req.num_computed_tokens, n, slots, req.num_computed_tokens + n == req.num_tokens)
        req.num_computed_tokens += n
        if item.samples:
            req.expect_output()
        return item

    def _fits(self, candidate: Req) -> bool:
        usages = [(len(r.kv_slots), max(0, r.max_kv_tokens - len(r.kv_slots))) for r in self.running]
        usages.append((0, candidate.max_kv_tokens))
        return predicted_peak(usages) <= self.config.num_slots

    def _make_room(self, n: int, req: Req) -> bool:
        """Free slots for `req` by preempting the most recently admitted requests behind it (not yet
        scheduled in this step). False if none is left to preempt. A victim whose last token is still in
        flight comes back in the same step with at most a chunk that stops short of it (all of it needs
        more slots than it freed); the token is known before the next step is scheduled."""
        while not self._can_alloc(n):
            victim = self.running[-1]
            if victim is req:
                return False
            self.running.pop()
            self._free(victim)
            victim.reset_for_recompute()
            self.waiting.appendleft(victim)
        return True

    def update(self, batch: Batch, sampled: dict[int, int]) -> list[Req]:
        """Record a step's tokens (steps in the order they were scheduled); `sampled` maps req id -> token.
        Returns the requests that finished."""
        finished = []
        for item in batch.items:
            req = item.req
            if self.kv is not None and self._still_holds(item):  # the prompt chunk is computed: share it
                self._cache(req, min(item.start + item.num_new_tokens, req.num_prompt_tokens))
            if not item.samples or req.req_id not in sampled:
                continue
            if req.status.is_finished:  # ended while the step ran (aborted, or by a token before this one)
                continue
            req.append_output(sampled[req.req_id])
            if req.status.is_finished:
                if self.kv is not None:  # prompt and outputs with KV, for the next turn of a chat
                    self._cache(req, min(len(req.kv_slots), req.num_tokens))
                self._remove(req)
                finished.append(req)
        return finished

    @staticmethod
    def _still_holds(item: ScheduledReq) -> bool:
        """The step's slots are still the request's (not preempted and admitted again since)."""
        req, end = item.req, item.start + item.num_new_tokens
        return (req.status == ReqStatus.RUNNING and item.start < req.num_prompt_tokens
                and req.kv_slots[item.start:end] == item.new_slots)
