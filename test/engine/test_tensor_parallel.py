"""Sharded models give the unsharded results: vision tower (qk-norm included) and language model, with
KV heads split (tp=2) and replicated (tp=4 over 2 KV heads), over gloo on the CPU. The sharded runs
schedule one step ahead as the router does, so every rank feeds back the tokens rank 0 sampled."""

import multiprocessing as mp
import queue
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from lightvlm.common.distributed import SINGLE, init_tp_group
from lightvlm.common.ports import free_ports
from lightvlm.engine.model_runner import ModelRunner, RunnerConfig
from lightvlm.engine.req import Req
from lightvlm.engine.scheduler import Scheduler, SchedulerConfig
from lightvlm.engine.visual_encoder import VisualEncoder
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.pipeline import ImageStore
from lightvlm.sampling_params import SamplingParams

from helpers import drive, load_image


def run_model(model_dir, tp):
    """Encode one image, then greedily decode 12 tokens for a prompt holding it. Returns (embeds, tokens)."""
    torch.set_num_threads(1)
    ckpt = LoadedCheckpoint.open(model_dir)
    processor = ckpt.processor
    image = load_image("coffee_strip_600x40.jpg")
    grid = processor.image_grid(*image.size)
    embeds = VisualEncoder(ckpt, tp=tp, show_progress=False).encode([processor.preprocess(image, grid)], [grid])[0]
    prompt = processor.encode_chat([{"role": "user", "content": [{"type": "image"},
                                                                 {"type": "text", "text": "What is this?"}]}],
                                   [grid])
    store = ImageStore()
    store["0123456789abcdef"] = embeds
    runner = ModelRunner(ckpt, RunnerConfig(num_slots=4096, max_reqs=4, max_len=2048), store, tp=tp,
                         show_progress=False)
    scheduler = Scheduler(SchedulerConfig(num_slots=4096, batch_max_tokens=64, running_max_req_size=4))
    req = Req(0, prompt.input_ids, SamplingParams(max_new_tokens=12, ignore_eos=True), 2048,
              images=(replace(prompt.images[0], key="0123456789abcdef"),))
    scheduler.add(req)

    def run_step(batch):  # prompt chunks of 64 tokens, then decode
        out = runner.step(batch.to_step_input())
        sampled = [dict(zip(out.req_ids, out.token_ids))]
        if tp.size > 1:  # rank 0 samples; every rank's scheduler needs the token
            dist.broadcast_object_list(sampled, src=0, group=tp.group)
        return sampled[0]

    drive(scheduler, run_step, lookahead=tp.size > 1)
    return embeds, req.output_ids


def rank_main(rank, size, port, model_dir, results):
    tp = init_tp_group(rank, size, f"tcp://127.0.0.1:{port}", torch.device("cpu"))
    embeds, tokens = run_model(model_dir, tp)
    if rank == 0:
        results.put((embeds.numpy(), tokens))  # by value: the rank exits before the test reads it
    dist.barrier()


@pytest.mark.parametrize(("checkpoint", "size"), [("tiny_llama", 2), ("tiny_qwen2", 2), ("tiny_qwen2", 4)])
def test_sharded_equals_unsharded(request, checkpoint, size):
    model_dir = request.getfixturevalue(checkpoint)
    expected_embeds, expected_tokens = run_model(model_dir, SINGLE)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_ports(1)[0]
    processes = [ctx.Process(target=rank_main, args=(r, size, port, model_dir, results)) for r in range(size)]
    for p in processes:
        p.start()
    try:
        while True:
            try:
                embeds, tokens = results.get(timeout=1)
                break
            except queue.Empty:
                failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                assert not failed, f"a rank failed with exit code {failed}"
        for p in processes:
            p.join(60)
            assert p.exitcode == 0
    finally:
        for p in processes:
            p.kill()
    assert torch.allclose(torch.from_numpy(embeds), expected_embeds, atol=1e-5)
    assert tokens == expected_tokens
