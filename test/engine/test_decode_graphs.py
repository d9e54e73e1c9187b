"""Decode steps through the graphs' static, padded buffers give the tokens of the plain forward.

The CPU cannot capture CUDA graphs, so these run the same padded static-buffer step eagerly
(`capture=False`, what DecodeGraphs does off CUDA): they prove the buffers, the padding to the captured
sizes and the spare slot the padding writes to. `make gpu-check` replays the captured graphs.
"""

import pytest
import torch

from lightvlm.config import parse_config
from lightvlm.engine.decode_graphs import graph_batch_sizes
from lightvlm.engine.model_runner import ModelRunner, RunnerConfig
from lightvlm.engine.req import Req
from lightvlm.engine.scheduler import Scheduler, SchedulerConfig
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.pipeline import ImageStore
from lightvlm.sampling_params import SamplingParams
from lightvlm.workers.model_worker import CUDA_RESERVE_BYTES, cuda_kv_budget, language_weight_bytes

from helpers import generate_on

NUM_SLOTS = 2048


def test_the_captured_sizes_climb_to_the_largest():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(30) == [1, 2, 4, 8, 16, 24, 30]


def make_runner(checkpoint, graph_max_batch_size):
    config = RunnerConfig(num_slots=NUM_SLOTS, max_reqs=8, max_len=256, graph_max_batch_size=graph_max_batch_size)
    return ModelRunner(LoadedCheckpoint.open(checkpoint), config, ImageStore(), show_progress=False)


def workload():
    """Five requests of different lengths: decode batches of 5, 4, 3, 2, 1 (3 is padded to 4). Request 0,
    whose first token sits in slot 0, lasts longest: a padding row writing anywhere but the spare slot
    would change its answer."""
    return [Req(i, [10 + i, 20, 30, 40 + i] * (i + 1), SamplingParams(max_new_tokens=18 - 3 * i, ignore_eos=True,
                                                                     do_sample=i % 2 == 1, seed=i, top_k=20),
                256) for i in range(5)]


def generate(runner):
    return generate_on(runner, Scheduler(SchedulerConfig(NUM_SLOTS, 512, 8)), workload())


def count_graph_steps(runner) -> list[int]:
    sizes, forward = [], runner.decode_graphs.forward

    def counted(state):
        sizes.append(state.input_ids.shape[0])
        return forward(state)

    runner.decode_graphs.forward = counted
    return sizes


def check_padded_decode(path):
    plain = make_runner(path, 0)
    assert plain.decode_graphs is None
    expected = generate(plain)
    graphed = make_runner(path, 4)
    assert graphed.decode_graphs.sizes == [1, 2, 4]
    assert graphed.kv.k[0].shape[1] == NUM_SLOTS + 1  # the spare slot the padding writes to
    sizes = count_graph_steps(graphed)
    assert generate(graphed) == expected
    assert 3 in sizes and 4 in sizes and max(sizes) == 4  # 3 ran padded to 4; batches of 5 ran the plain way


def test_padded_graph_decode_gives_the_plain_forwards_tokens(tiny_qwen2):
    check_padded_decode(tiny_qwen2)


@pytest.mark.parametrize("qwen_vl_reference", ["qwen2_vl"], indirect=True)
def test_padded_graph_decode_with_mrope_positions(qwen_vl_reference):
    check_padded_decode(qwen_vl_reference)  # positions [3, T]


def test_a_padded_step_has_the_plain_steps_logits(tiny_qwen2):
    runner = make_runner(tiny_qwen2, 8)
    scheduler = Scheduler(SchedulerConfig(NUM_SLOTS, 512, 8))
    for req in workload()[:3]:
        scheduler.add(req)
    batch = scheduler.schedule()  # the prefills
    out = runner.step(batch.to_step_input())
    scheduler.update(batch, dict(zip(out.req_ids, out.token_ids)))
    step = runner.fill_pending(scheduler.schedule().to_step_input(), {})  # three decodes
    with torch.inference_mode():
        state, _ = runner.prepare(step)
        assert runner.decode_graphs.fits(state)
        padded = runner.decode_graphs.forward(state)  # padded to 4
        plain = runner.model(state)
    assert padded.shape == plain.shape == (3, runner.vocab_size)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)  # fp32; a batch of 4 rows, not 3


def test_graph_flags_reach_the_model_config_on_cuda_only():
    assert parse_config([], "/tmp/model", "cuda", 1).model.graph_max_batch_size == 64
    assert parse_config(["--graph_max_batch_size", "16"], "/tmp/model", "cuda", 1).model.graph_max_batch_size == 16
    assert parse_config(["--disable_cuda_graph"], "/tmp/model", "cuda", 1).model.graph_max_batch_size == 0
    assert parse_config(["--graph_max_batch_size", "16"], "/tmp/model", "cpu", 0).model.graph_max_batch_size == 0
    with pytest.raises(SystemExit):
        parse_config(["--graph_max_batch_size", "0"], "/tmp/model", "cuda", 1)


def test_the_kv_plan_counts_the_weights_before_they_load(tiny_qwen2):
    """The weights counted from the config are the language model's parameters once loaded (the CUDA
    KV budget subtracts them, planned before loading)."""
    runner = make_runner(tiny_qwen2, 0)
    loaded = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    counted = language_weight_bytes(LoadedCheckpoint.open(tiny_qwen2).config.text, torch.float32, 1)
    assert 0.99 * loaded <= counted <= loaded  # the biases and the final norm are left out
    assert cuda_kv_budget(80 << 30, 100 << 30, 0.9, 10 << 30) == 60 * 2**30 - CUDA_RESERVE_BYTES
