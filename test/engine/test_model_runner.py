"""The model runner keeps one bad request from hurting the others in its step, and gives the same tokens
when each step is scheduled before the previous one's tokens are known (the router's overlap)."""

import pytest

from lightvlm.engine.model_runner import ModelRunner, RunnerConfig
from lightvlm.engine.req import Req, ReqStatus
from lightvlm.engine.scheduler import Scheduler, SchedulerConfig
from lightvlm.io_struct import PENDING_TOKEN, ImageItem, StepInput
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.pipeline import ImageStore
from lightvlm.sampling_params import SamplingParams

from helpers import generate_on


@pytest.fixture
def runner(tiny_qwen2):
    return ModelRunner(LoadedCheckpoint.open(tiny_qwen2), RunnerConfig(num_slots=4096, max_reqs=4, max_len=512),
                       ImageStore(), show_progress=False)


def run(runner, reqs, steps=6):
    scheduler = Scheduler(SchedulerConfig(4096, 512, 4))
    for req in reqs:
        scheduler.add(req)
    failed = {}
    for _ in range(steps):
        batch = scheduler.schedule()
        if batch is None:
            break
        out = runner.step(batch.to_step_input())
        for req_id, error in out.failed:  # what the router does with a failed request
            failed[req_id] = error
            scheduler.finish(next(i.req for i in batch.items if i.req.req_id == req_id), ReqStatus.FINISHED_ABORTED)
        scheduler.update(batch, dict(zip(out.req_ids, out.token_ids)))
        runner.release(scheduler.take_released())
    return failed


def prompt(i):
    return [10 + i, 20, 30, 40, 50]


def test_a_request_that_cannot_register_fails_alone(runner):
    alone = Req(0, prompt(0), SamplingParams(max_new_tokens=5), 512)
    run(runner, [alone])
    good = Req(1, prompt(0), SamplingParams(max_new_tokens=5), 512)
    bad = Req(2, prompt(1), SamplingParams(max_new_tokens=5, do_sample=True, seed=2**70), 512)  # past validation
    rows_before = len(runner.free_rows)
    failed = run(runner, [good, bad])
    assert set(failed) == {2}
    assert good.output_ids == alone.output_ids
    assert len(runner.free_rows) == rows_before  # nothing kept for the failed one


def test_a_request_whose_image_is_missing_fails_alone(runner):
    alone = Req(0, prompt(0), SamplingParams(max_new_tokens=5), 512)
    run(runner, [alone])
    good = Req(1, prompt(0), SamplingParams(max_new_tokens=5), 512)
    bad = Req(2, [1, 2, 3, 4, 5, 6], SamplingParams(max_new_tokens=5), 512,
              images=(ImageItem("0123456789abcdef", 2, 2, (1, 1)),))
    failed = run(runner, [good, bad])
    assert set(failed) == {2} and "KeyError" in failed[2]
    assert good.output_ids == alone.output_ids


def sample_all(runner, reqs, num_slots, overcommit=False, lookahead=False, batch_max_tokens=512):
    scheduler = Scheduler(SchedulerConfig(num_slots, batch_max_tokens, 4))
    if overcommit:
        scheduler._fits = lambda req: True  # admit beyond the predicted peak, to force preemptions
    outputs = generate_on(runner, scheduler, reqs, lookahead)
    assert scheduler.allocator.num_used == 0 and len(runner.free_rows) == runner.config.max_reqs
    return outputs


def mixed_reqs():
    """Greedy, stopping on EOS or at their length; seeded sampling with penalties; different lengths."""
    eos = frozenset({617, 159})  # reached by requests 0 and 2 on the tiny checkpoint
    return [Req(0, prompt(0) * 3, SamplingParams(max_new_tokens=25), 512, eos_token_ids=eos),
            Req(1, prompt(1), SamplingParams(max_new_tokens=7, ignore_eos=True), 512, eos_token_ids=eos),
            Req(2, prompt(2) * 4, SamplingParams(max_new_tokens=30, do_sample=True, temperature=1.3, seed=11,
                                                 repetition_penalty=1.3, frequency_penalty=0.5),
                512, eos_token_ids=eos),
            Req(3, prompt(3) * 2, SamplingParams(max_new_tokens=20, do_sample=True, top_k=5, seed=3,
                                                 presence_penalty=0.7, ignore_eos=True), 512, eos_token_ids=eos),
            Req(4, prompt(4), SamplingParams(max_new_tokens=1), 512, eos_token_ids=eos)]


@pytest.mark.parametrize("num_slots", [4096, 50])
def test_scheduling_a_step_ahead_gives_the_same_tokens(runner, num_slots):
    expected = sample_all(runner, mixed_reqs(), num_slots=4096)
    assert any(len(out) < r.sampling.max_new_tokens for out, r in zip(expected, mixed_reqs()))  # some hit EOS
    reqs = mixed_reqs()
    got = sample_all(runner, reqs, num_slots=num_slots, overcommit=num_slots < 4096, lookahead=True,
                     batch_max_tokens=16)  # prefill chunks next to decodes
    assert got == expected
    assert all(PENDING_TOKEN not in out for out in got)
    if num_slots < 4096:
        assert sum(r.num_preemptions for r in reqs) >= 1


def test_a_pending_input_without_a_sampled_token_fails_alone(runner):
    """A PENDING_TOKEN for a request whose last step sampled nothing (it failed, say) fails that
    request only."""
    scheduler = Scheduler(SchedulerConfig(4096, 512, 4))
    reqs = [Req(i, prompt(i), SamplingParams(max_new_tokens=5), 512) for i in range(2)]
    for req in reqs:
        scheduler.add(req)
    batch = scheduler.schedule()
    step = batch.to_step_input()
    out = runner.step(StepInput(step.req_ids, step.num_new_tokens, step.input_ids, step.new_slots,
                                samples=(True, False), new_reqs=step.new_reqs))  # request 1 samples nothing
    assert out.req_ids == (0,)
    follow = scheduler.schedule()  # both decode next, their inputs still pending
    assert follow.to_step_input().input_ids == (PENDING_TOKEN, PENDING_TOKEN)
    out = runner.step(follow.to_step_input())
    assert out.req_ids == (0,) and [req_id for req_id, _ in out.failed] == [1]
    assert "never sampled" in out.failed[0][1]


def test_seeded_sampling_goes_on_where_it_was_after_a_preemption(runner):
    def reqs():
        return [Req(i, prompt(i) * 4, SamplingParams(max_new_tokens=30, do_sample=True, temperature=1.5, seed=7 + i,
                                                  ignore_eos=True), 512) for i in range(2)]

    calm = sample_all(runner, reqs(), num_slots=4096)
    pressed = reqs()
    assert sample_all(runner, pressed, num_slots=64, overcommit=True) == calm
    assert pressed[1].num_preemptions >= 1
