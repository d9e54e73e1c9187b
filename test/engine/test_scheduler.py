"""Scheduling policy, without torch: budgets, admission by predicted peak, preemption, abort."""

import random

from lightvlm.engine.req import Req, ReqStatus
from lightvlm.engine.scheduler import Scheduler, SchedulerConfig, predicted_peak
from lightvlm.io_struct import PENDING_TOKEN
from lightvlm.sampling_params import SamplingParams

from helpers import drive

EOS = 2


def make_req(req_id, prompt_len, max_new, max_total=10_000):
    return Req(req_id, list(range(10, 10 + prompt_len)), SamplingParams(max_new_tokens=max_new), max_total,
               eos_token_ids=frozenset({EOS}))


def run_step(scheduler, token=7):
    batch = scheduler.schedule()
    if batch is None:
        return None, []
    sampled = {item.req.req_id: token for item in batch.items if item.samples}
    return batch, scheduler.update(batch, sampled)


def test_predicted_peak():
    assert predicted_peak([]) == 0
    assert predicted_peak([(10, 0)]) == 10
    # two requests: (10 held, grows 5) and (20 held, grows 1). Peak when the short one is about to end
    # (21 + 11 = 32) or the long one alone later (15): 32.
    assert predicted_peak([(10, 5), (20, 1)]) == 32


def test_decodes_and_prefill_chunks_share_the_token_budget():
    scheduler = Scheduler(SchedulerConfig(num_slots=1000, batch_max_tokens=16, running_max_req_size=8))
    scheduler.add(make_req(0, 4, 10))
    run_step(scheduler)  # request 0 prefilled and sampled its first token
    scheduler.add(make_req(1, 40, 5))
    batch, _ = run_step(scheduler)
    sizes = {item.req.req_id: item.num_new_tokens for item in batch.items}
    assert sizes == {0: 1, 1: 15}  # one decode token, the rest of the budget for a prefill chunk
    assert not batch.items[1].samples  # mid-prompt chunk: nothing to sample yet
    while scheduler.has_unfinished:
        run_step(scheduler)
    scheduler.allocator.check_integrity()
    assert scheduler.allocator.num_used == 0


def test_admission_waits_for_predicted_peak():
    scheduler = Scheduler(SchedulerConfig(num_slots=100, batch_max_tokens=1000, running_max_req_size=8))
    scheduler.add(make_req(0, 30, 40))  # peaks at 69 slots
    scheduler.add(make_req(1, 20, 20))  # would push the peak past 100
    batch, _ = run_step(scheduler)
    assert [item.req.req_id for item in batch.items] == [0]
    steps = 0
    while scheduler.running and scheduler.running[0].req_id == 0 and steps < 100:
        run_step(scheduler)
        steps += 1
        assert scheduler.allocator.num_used <= 100
    assert steps > 10  # request 1 waited until request 0 no longer crowds it out


def test_running_max_req_size_caps_the_batch():
    scheduler = Scheduler(SchedulerConfig(num_slots=10_000, batch_max_tokens=1000, running_max_req_size=3))
    for i in range(5):
        scheduler.add(make_req(i, 5, 3))
    batch, _ = run_step(scheduler)
    assert len(batch.items) == 3 and len(scheduler.waiting) == 2


def test_preemption_frees_the_newest_and_recomputes_it():
    scheduler = Scheduler(SchedulerConfig(num_slots=40, batch_max_tokens=100, running_max_req_size=8))
    a, b = make_req(0, 10, 25), make_req(1, 10, 25)
    scheduler.add(a)
    scheduler.add(b)
    scheduler._fits = lambda req: True  # over-commit on purpose to force pressure
    outputs_before = None
    released = []
    for _ in range(200):
        batch, _ = run_step(scheduler)
        if batch is None:
            break
        released += batch.released
        if b.num_preemptions and outputs_before is None:
            outputs_before = list(b.output_ids)
        scheduler.allocator.check_integrity()
    assert b.num_preemptions >= 1 and a.num_preemptions == 0  # the newest made way
    assert 1 in released  # workers were told to drop its state
    assert a.status == b.status == ReqStatus.FINISHED_LENGTH
    assert len(b.output_ids) == 25 and b.output_ids[:len(outputs_before)] == outputs_before
    assert scheduler.allocator.num_used == 0


def test_abort_frees_kv_slots_and_tells_workers():
    scheduler = Scheduler(SchedulerConfig(num_slots=1000, batch_max_tokens=1000, running_max_req_size=8))
    scheduler.add(make_req(0, 50, 100))
    scheduler.add(make_req(1, 5, 100))
    run_step(scheduler)
    assert scheduler.allocator.num_used == 55
    aborted = scheduler.abort(0)
    assert aborted.status == ReqStatus.FINISHED_ABORTED and aborted.kv_slots == []
    assert scheduler.allocator.num_used == 5
    batch, _ = run_step(scheduler)
    assert batch.released == [0]
    assert scheduler.abort(12345) is None


def test_requests_released_when_the_batch_runs_empty_are_told_with_the_next_step():
    """The workers learn of finished requests only through a step: a schedule() with nothing to run must
    keep them for the next one (else the workers hold their rows and images for ever)."""
    scheduler = Scheduler(SchedulerConfig(num_slots=1000, batch_max_tokens=1000, running_max_req_size=8))
    scheduler.add(make_req(0, 5, 1))
    run_step(scheduler)  # its only token: finished
    assert scheduler.schedule() is None
    scheduler.add(make_req(1, 5, 1))
    assert scheduler.schedule().released == [0]


def test_eos_min_tokens_and_stop_ids():
    req = make_req(0, 3, 10)
    req.sampling.min_new_tokens = 2
    req.sampling.stop_token_ids = [9]
    req.append_output(EOS)  # too early to stop
    assert req.status == ReqStatus.WAITING
    req.append_output(5)
    req.append_output(9)
    assert req.status == ReqStatus.FINISHED_STOPPED
    ignoring = make_req(1, 3, 2)
    ignoring.sampling.ignore_eos = True
    ignoring.append_output(EOS)
    ignoring.append_output(EOS)
    assert ignoring.status == ReqStatus.FINISHED_LENGTH


def test_context_limit_caps_max_new_tokens():
    req = make_req(0, 90, 50, max_total=100)
    assert req.max_new_tokens == 10


def test_randomized_workload_never_leaks_slots():
    rng = random.Random(1)
    scheduler = Scheduler(SchedulerConfig(num_slots=300, batch_max_tokens=64, running_max_req_size=6))
    next_id = 0
    for _ in range(400):
        if rng.random() < 0.3:
            scheduler.add(make_req(next_id, rng.randint(1, 60), rng.randint(1, 30)))
            next_id += 1
        if rng.random() < 0.05 and scheduler.running:
            scheduler.abort(rng.choice(scheduler.running).req_id)
        run_step(scheduler, token=rng.choice([EOS, 5, 6, 7, 8]))
        scheduler.allocator.check_integrity()
        assert scheduler.allocator.num_used == sum(len(r.kv_slots) for r in scheduler.running)
    while scheduler.has_unfinished:
        run_step(scheduler)
    assert scheduler.allocator.num_used == 0


def test_the_next_step_is_scheduled_before_this_ones_tokens_are_back():
    scheduler = Scheduler(SchedulerConfig(num_slots=1000, batch_max_tokens=1000, running_max_req_size=8))
    req = make_req(0, 4, 3)
    scheduler.add(req)
    first = scheduler.schedule()  # the prompt; samples the first output
    assert req.output_ids == [PENDING_TOKEN] and req.num_computed_tokens == 4
    second = scheduler.schedule()  # feeds back the token the first step is sampling
    assert second.to_step_input().input_ids == (PENDING_TOKEN,) and second.items[0].samples
    assert scheduler.update(first, {0: 5}) == [] and req.output_ids == [5, PENDING_TOKEN]
    third = scheduler.schedule()
    assert third.to_step_input().input_ids == (PENDING_TOKEN,)
    assert req.output_ids == [5, PENDING_TOKEN, PENDING_TOKEN]
    assert scheduler.schedule() is None  # three outputs are on their way: the last is never fed back
    assert len(req.kv_slots) == req.max_kv_tokens == 6
    scheduler.update(second, {0: 6})
    assert scheduler.update(third, {0: 7}) == [req]
    assert req.output_ids == [5, 6, 7] and req.status == ReqStatus.FINISHED_LENGTH
    assert scheduler.allocator.num_used == 0


def test_tokens_in_flight_after_eos_are_dropped():
    scheduler = Scheduler(SchedulerConfig(num_slots=1000, batch_max_tokens=1000, running_max_req_size=8))
    req = make_req(0, 4, 10)
    scheduler.add(req)
    first = scheduler.schedule()
    second = scheduler.schedule()
    assert scheduler.update(first, {0: EOS}) == [req]
    assert req.output_ids == [EOS] and req.status == ReqStatus.FINISHED_STOPPED
    assert scheduler.allocator.num_used == 0  # its slots are free while the second step still runs
    assert scheduler.update(second, {0: 9}) == [] and req.output_ids == [EOS]
    scheduler.add(make_req(1, 2, 2))
    assert scheduler.schedule().released == [0]  # the workers forget it before the next step


def test_abort_with_a_step_in_flight_drops_its_token():
    scheduler = Scheduler(SchedulerConfig(num_slots=1000, batch_max_tokens=1000, running_max_req_size=8))
    req = make_req(0, 4, 10)
    scheduler.add(req)
    first = scheduler.schedule()
    scheduler.abort(0)
    assert req.output_ids == [] and scheduler.allocator.num_used == 0
    assert scheduler.update(first, {0: 5}) == [] and req.output_ids == []


def test_a_step_ahead_gives_the_same_outputs_under_preemption():
    """Tokens that depend only on (request, position): scheduling a step ahead must not change any
    request's outputs, even when requests are preempted while their tokens are in flight."""
    def token(req_id, position):
        return EOS if (req_id * 7 + position) % 13 == 0 else 5 + (req_id + position) % 4

    def run(lookahead):
        rng = random.Random(3)
        scheduler = Scheduler(SchedulerConfig(num_slots=120, batch_max_tokens=24, running_max_req_size=6))
        scheduler._fits = lambda req: True  # over-commit on purpose to force preemptions
        reqs = [make_req(i, rng.randint(1, 40), rng.randint(1, 30)) for i in range(12)]
        for req in reqs:
            scheduler.add(req)

        def sample(batch):
            scheduler.allocator.check_integrity()
            assert all(len(r.kv_slots) <= r.max_kv_tokens for r in scheduler.running)
            return {item.req.req_id: token(item.req.req_id, item.start + item.num_new_tokens)
                    for item in batch.items if item.samples}

        drive(scheduler, sample, lookahead)
        scheduler.allocator.check_integrity()
        assert scheduler.allocator.num_used == 0
        return [r.output_ids for r in reqs], sum(r.num_preemptions for r in reqs)

    (expected, _), (got, preemptions) = run(lookahead=False), run(lookahead=True)
    assert got == expected and preemptions >= 3
    assert any(out[-1] == EOS for out in got)
