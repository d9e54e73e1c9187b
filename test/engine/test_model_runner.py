"""The model runner keeps one bad request from hurting the others in its step."""

import pytest

from lightvlm.engine.model_runner import ModelRunner, RunnerConfig
from lightvlm.engine.req import Req, ReqStatus
from lightvlm.engine.scheduler import Scheduler, SchedulerConfig
from lightvlm.io_struct import ImageRef
from lightvlm.models.registry import LoadedCheckpoint
from lightvlm.pipeline import ImageStore
from lightvlm.sampling_params import SamplingParams


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
              images=(ImageRef("0123456789abcdef", 2, 2),))
    failed = run(runner, [good, bad])
    assert set(failed) == {2} and "KeyError" in failed[2]
    assert good.output_ids == alone.output_ids


def sample_all(runner, reqs, num_slots, overcommit=False):
    scheduler = Scheduler(SchedulerConfig(num_slots, 512, 4))
    if overcommit:
        scheduler._fits = lambda req: True  # admit beyond the predicted peak, to force preemptions
    for req in reqs:
        scheduler.add(req)
    while scheduler.has_unfinished:
        batch = scheduler.schedule()
        out = runner.step(batch.to_step_input())
        scheduler.update(batch, dict(zip(out.req_ids, out.token_ids)))
        runner.release(scheduler.take_released())
    return [r.output_ids for r in reqs]


def test_seeded_sampling_goes_on_where_it_was_after_a_preemption(runner):
    def reqs():
        return [Req(i, prompt(i) * 4, SamplingParams(max_new_tokens=30, do_sample=True, temperature=1.5, seed=7 + i,
                                                  ignore_eos=True), 512) for i in range(2)]

    calm = sample_all(runner, reqs(), num_slots=4096)
    pressed = reqs()
    assert sample_all(runner, pressed, num_slots=64, overcommit=True) == calm
    assert pressed[1].num_preemptions >= 1
