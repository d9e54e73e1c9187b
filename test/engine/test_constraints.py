"""Logit rules in the model runner: the output grammar, bad words and prompt logprobs, under the router's
one-step-ahead scheduling, chunked prefill and preemption; and requests without rules untouched."""

import json
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from lightvlm.common.grammar import GrammarCompiler
from lightvlm.engine.constraints import GrammarMasks, LogitRules, bad_words_ids
from lightvlm.engine.model_runner import ModelRunner, RunnerConfig
from lightvlm.engine.req import Req, ReqStatus
from lightvlm.engine.scheduler import Scheduler, SchedulerConfig
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.pipeline import ImageStore
from lightvlm.sampling_params import Constraint, SamplingParams

from hf_reference import hf_model

EOS = frozenset({700})  # <|im_end|> of the tiny checkpoint


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=99)
    admin: bool
    role: Literal["viewer", "editor"]


SCHEMA = Constraint("json_schema", json.dumps({**Person.model_json_schema(), "additionalProperties": False}))


@pytest.fixture(scope="module")
def ckpt(tiny_qwen2):
    return LoadedCheckpoint.open(tiny_qwen2)


@pytest.fixture(scope="module")
def runner(ckpt):
    return ModelRunner(ckpt, RunnerConfig(num_slots=4096, max_reqs=6, max_len=512), ImageStore(), show_progress=False)


def run(runner, reqs, num_slots=4096, overcommit=False, lookahead=False, batch_max_tokens=512):
    """The router's loop in one process: requests whose grammar is complete end as it ends them."""
    scheduler = Scheduler(SchedulerConfig(num_slots, batch_max_tokens, 6))
    if overcommit:
        scheduler._fits = lambda req: True  # admit beyond the predicted peak, to force preemptions
    for req in reqs:
        scheduler.add(req)
    by_id, in_flight = {r.req_id: r for r in reqs}, []
    while scheduler.has_unfinished or in_flight:
        batch = scheduler.schedule()
        if batch is not None:
            in_flight.append((batch, runner.step(batch.to_step_input())))
        if in_flight and (len(in_flight) > lookahead or batch is None):
            done, out = in_flight.pop(0)
            assert not out.failed, out.failed
            scheduler.update(done, dict(zip(out.req_ids, out.token_ids)))
            for req_id in out.finished:
                if not by_id[req_id].status.is_finished:
                    scheduler.finish(by_id[req_id], ReqStatus.FINISHED_STOPPED)
    runner.release(scheduler.take_released())
    assert len(runner.free_rows) == runner.config.max_reqs
    return [r.output_ids for r in reqs]


def prompt(i):
    return [10 + i, 20, 30, 40, 50] * 3


def plain_reqs():
    return [Req(0, prompt(0), SamplingParams(max_new_tokens=12, ignore_eos=True), 512),
            Req(1, prompt(1), SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.2, seed=5,
                                             ignore_eos=True), 512)]


def json_reqs(first_id=10, n=3):
    return [Req(first_id + i, prompt(i + 2), SamplingParams(max_new_tokens=120, do_sample=True, temperature=1.0,
                                                            seed=100 + i, constraint=SCHEMA), 512, eos_token_ids=EOS)
            for i in range(n)]


def test_requests_without_rules_get_the_same_tokens_next_to_constrained_ones(runner):
    alone = run(runner, plain_reqs())
    mixed = run(runner, [*plain_reqs(), *json_reqs(n=2)], lookahead=True)
    assert mixed[:2] == alone


def test_constrained_outputs_match_the_schema_and_end_with_it(runner, ckpt):
    reqs = json_reqs(n=2)
    for out, req in zip(run(runner, reqs, lookahead=True), reqs):
        Person.model_validate_json(ckpt.processor.tokenizer.decode(out))
        assert req.status == ReqStatus.FINISHED_STOPPED and not set(out) & EOS  # ended by the grammar, no EOS step


def test_grammar_survives_preemption_and_prefill_chunks(runner, ckpt):
    calm = run(runner, json_reqs())
    pressed = json_reqs()
    assert run(runner, pressed, num_slots=150, overcommit=True, lookahead=True, batch_max_tokens=8) == calm
    assert sum(r.num_preemptions for r in pressed) >= 1
    for out in calm:
        Person.model_validate_json(ckpt.processor.tokenizer.decode(out))


def test_bad_words_and_allowed_ids_and_bias(runner, ckpt):
    tokenizer = ckpt.processor.tokenizer
    free = run(runner, [Req(0, prompt(0), SamplingParams(max_new_tokens=20, ignore_eos=True), 512)])[0]
    start = next(i for i in range(len(free) - 1)  # two output tokens that are how their text tokenizes
                 if tokenizer.encode(tokenizer.decode(free[i:i + 2]), add_special_tokens=False) == free[i:i + 2])
    word = tokenizer.decode(free[start:start + 2])
    banned = run(runner, [Req(0, prompt(0), SamplingParams(max_new_tokens=20, ignore_eos=True, bad_words=[word]),
                              512)])[0]
    assert banned[:start + 1] == free[:start + 1] and banned[start + 1] != free[start + 1]
    sequences = bad_words_ids(tokenizer, [word])
    assert not any(tuple(banned[i:i + len(s)]) == s for s in sequences for i in range(len(banned)))
    allowed = run(runner, [Req(0, prompt(0), SamplingParams(max_new_tokens=8, do_sample=True, seed=1,
                                                            allowed_token_ids=[5, 9, 11]), 512)])[0]
    assert set(allowed) <= {5, 9, 11}
    biased = run(runner, [Req(0, prompt(0), SamplingParams(max_new_tokens=8, logit_bias={77: 100.0}), 512)])[0]
    assert biased == [77] * 8
    removed = run(runner, [Req(0, prompt(0), SamplingParams(max_new_tokens=20, ignore_eos=True,
                                                            logit_bias={free[0]: -100.0}), 512)])[0]
    assert free[0] not in removed


@pytest.mark.parametrize("batch_max_tokens", [512, 4])
def test_prompt_logprobs_equal_transformers_log_softmax(runner, tiny_qwen2, batch_max_tokens):
    ids = prompt(0) + [60, 70, 80]
    req = Req(0, ids, SamplingParams(max_new_tokens=1, prompt_logprobs=2), 512)
    scheduler = Scheduler(SchedulerConfig(4096, batch_max_tokens, 6))
    scheduler.add(req)
    got = {}
    while scheduler.has_unfinished:
        batch = scheduler.schedule()
        out = runner.step(batch.to_step_input())
        for _, first, values in out.prompt_logprobs:
            got.update(enumerate(values, start=first))
        scheduler.update(batch, dict(zip(out.req_ids, out.token_ids)))
    runner.release(scheduler.take_released())
    assert sorted(got) == list(range(1, len(ids)))  # every token but the first, once, over all the chunks
    with torch.no_grad():
        reference = hf_model(tiny_qwen2)(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    expected = reference.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor([got[i].logprob for i in range(1, len(ids))]), expected, atol=1e-4)
    assert [got[i].token_id for i in range(1, len(ids))] == ids[1:]
    top = reference[2].topk(2)
    assert [t for t, _ in got[3].top] == top.indices.tolist()


def test_masks_filled_in_the_background_equal_those_filled_in_line(ckpt):
    """The GPU runner fills masks in a thread during the forward; the CPU runner in line."""
    compiler = GrammarCompiler(ckpt.processor.tokenizer, ckpt.config.text.vocab_size, ckpt.eos_token_ids)
    masks = {mode: GrammarMasks(compiler, 3, background=mode) for mode in (False, True)}
    rules = {mode: [LogitRules(matcher=compiler.matcher(SCHEMA.kind, SCHEMA.value)) for _ in range(2)]
             for mode in (False, True)}
    for mode in (False, True):
        for r in rules[mode]:
            r.consume(0, ckpt.processor.tokenizer.encode("{", add_special_tokens=False)[0])
        masks[mode].start([(0, rules[mode][0]), (2, rules[mode][1])])
        masks[mode].wait()
        assert all(r.mask_ready for r in rules[mode])
    assert torch.equal(masks[False].bits[[0, 2]], masks[True].bits[[0, 2]])
    assert not torch.equal(masks[True].bits[0], torch.full_like(masks[True].bits[0], -1))  # a real mask
