"""The scheduler with the prefix cache, against a fake worker that checks every slot it reads holds
the KV of the right prefix: a small pool, shared prefixes, preemption, eviction and aborts."""

from lightvlm.engine.req import Req, ReqStatus
from lightvlm.engine.scheduler import Scheduler, SchedulerConfig
from lightvlm.sampling_params import SamplingParams

SHARED = list(range(100, 140))  # a long shared system prompt
MAX_NEW = 10


class FakeWorker:
    """Slot -> the prefix whose last token's KV it holds; tokens are a function of the whole sequence."""

    def __init__(self):
        self.kv: dict[int, tuple] = {}
        self.table: dict[int, list[int]] = {}
        self.num_prompt_tokens_computed = 0

    def run(self, scheduler, batch) -> dict[int, int]:
        step = batch.to_step_input()
        for req_id in step.released:
            self.table.pop(req_id, None)
        for init in step.new_reqs:
            self.table[init.req_id] = list(init.cached_slots)
        sampled = {}
        for item in batch.items:
            req = item.req
            table = self.table[req.req_id]
            assert len(table) == item.start, "the worker's slots and the scheduler's disagree"
            tokens = tuple(req.token_at(i) for i in range(item.start + item.num_new_tokens))
            for p, slot in enumerate(table):
                assert self.kv[slot] == tokens[:p + 1], f"request {req.req_id} reads wrong KV at {p}"
            for p, slot in enumerate(item.new_slots, start=item.start):
                self.kv[slot] = tokens[:p + 1]
            table.extend(item.new_slots)
            self.num_prompt_tokens_computed += max(0, min(item.start + item.num_new_tokens, req.num_prompt_tokens)
                                                   - item.start)
            if item.samples:
                sampled[req.req_id] = 10 + hash(tokens) % 50
        return sampled


def make_reqs():
    return [Req(i, SHARED + [200 + i % 5] * 10, SamplingParams(max_new_tokens=MAX_NEW), 10_000) for i in range(16)]


def serve(use_prefix_cache, num_slots, aborts=None):
    """Run 16 requests to the end; aborts: {step: (req_id, 'prefill'|'decode')}. Returns outputs by id."""
    scheduler = Scheduler(SchedulerConfig(num_slots=num_slots, batch_max_tokens=16, running_max_req_size=16,
                                          use_prefix_cache=use_prefix_cache))
    worker = FakeWorker()
    reqs = make_reqs()
    for req in reqs:
        scheduler.add(req)
    aborted, steps = set(), 0
    while scheduler.has_unfinished:
        for req_id, phase in (aborts or {}).get(steps, []):
            req = scheduler.reqs[req_id]
            in_prefill = req.num_computed_tokens < req.num_prompt_tokens
            assert in_prefill == (phase == "prefill"), f"request {req_id} is not in {phase} at step {steps}"
            scheduler.abort(req_id)
            aborted.add(req_id)
        batch = scheduler.schedule()
        assert batch is not None
        scheduler.update(batch, worker.run(scheduler, batch))
        scheduler.check_integrity()
        steps += 1
    scheduler.check_integrity()
    if scheduler.kv is not None:
        assert scheduler.kv.root.refcount == 0
        assert scheduler.allocator.num_free + scheduler.kv.num_tree_slots == num_slots
    else:
        assert scheduler.allocator.num_free == num_slots
    outs = {r.req_id: list(r.output_ids) for r in reqs if r.req_id not in aborted}
    assert all(r.status == (ReqStatus.FINISHED_ABORTED if r.req_id in aborted else ReqStatus.FINISHED_LENGTH)
               for r in reqs)
    scheduler.num_preemptions = sum(r.num_preemptions for r in reqs)
    return outs, scheduler, worker


def test_small_pool_serves_sixteen_shared_prefix_requests_like_the_uncached_run():
    num_slots = 90  # about 1.5 requests of up to 59 slots
    uncached, _, worker_off = serve(False, num_slots)
    outs, scheduler, worker_on = serve(True, num_slots)
    assert outs == uncached
    assert scheduler.num_prompt_tokens_cached > 0 and scheduler.kv.num_evicted_tokens > 0
    assert worker_on.num_prompt_tokens_computed < worker_off.num_prompt_tokens_computed
    assert worker_on.num_prompt_tokens_computed == (scheduler.num_prompt_tokens_scheduled
                                                    - scheduler.num_prompt_tokens_cached)


def test_preemption_with_shared_prefixes_keeps_the_kv_right():
    outs, scheduler, _ = serve(True, 70)  # tight: requests preempt each other
    uncached, _, _ = serve(False, 70)
    assert outs == uncached
    assert scheduler.num_preemptions > 0 and scheduler.num_prompt_tokens_cached > 0


def find_phase_steps(num_slots):
    """A step at which request 3 is mid-prefill and one where request 5 is mid-decode, in the cached run."""
    scheduler = Scheduler(SchedulerConfig(num_slots=num_slots, batch_max_tokens=16, running_max_req_size=16,
                                          use_prefix_cache=True))
    worker = FakeWorker()
    for req in make_reqs():
        scheduler.add(req)
    prefill = decode = None
    step = 0
    while scheduler.has_unfinished and (prefill is None or decode is None):
        r3, r5 = scheduler.reqs.get(3), scheduler.reqs.get(5)
        if prefill is None and r3 and 0 < r3.num_computed_tokens < r3.num_prompt_tokens:
            prefill = step
        if decode is None and r5 and r5.num_computed_tokens > r5.num_prompt_tokens and r5.status == ReqStatus.RUNNING:
            decode = step
        batch = scheduler.schedule()
        scheduler.update(batch, worker.run(scheduler, batch))
        step += 1
    return prefill, decode


def test_aborts_mid_prefill_and_mid_decode_leak_nothing():
    num_slots = 200
    prefill, decode = find_phase_steps(num_slots)
    assert prefill is not None and decode is not None
    aborts = {prefill: [(3, "prefill")]}
    aborts.setdefault(decode, []).append((5, "decode"))
    outs, _, _ = serve(True, num_slots, aborts)
    uncached, _, _ = serve(False, num_slots)
    assert outs == {k: v for k, v in uncached.items() if k not in (3, 5)}
