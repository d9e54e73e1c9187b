"""The ceiling of our own engine: the model runner's loop alone, no server around it.

    python -m benchmark.engine_ceiling --model_dir DIR --batch_sizes 8 16 32 64

Each batch prefills `prompt_tokens` tokens per request, then decodes `output_tokens` tokens (ignoring
EOS) with the same Scheduler and ModelRunner the server uses. Reported: decode tokens/s (the decode
steps only) and end-to-end output tokens/s (prefill included).
"""

import argparse
import json
import time

import torch

from lightvlm.engine.model_runner import ModelRunner, RunnerConfig
from lightvlm.engine.req import Req
from lightvlm.engine.scheduler import Scheduler, SchedulerConfig
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.pipeline import ImageStore
from lightvlm.sampling_params import SamplingParams


def measure(runner: ModelRunner, batch_size: int, prompt_tokens: int, output_tokens: int) -> dict:
    num_slots = runner.config.num_slots
    scheduler = Scheduler(SchedulerConfig(num_slots, 8192, batch_size))
    for i in range(batch_size):
        prompt = [(100 + 7 * i + j) % 1000 + 10 for j in range(prompt_tokens)]
        scheduler.add(Req(i, prompt, SamplingParams(max_new_tokens=output_tokens, ignore_eos=True),
                          prompt_tokens + output_tokens))
    started = time.perf_counter()
    decode_started, decode_steps = None, 0
    while scheduler.has_unfinished:
        batch = scheduler.schedule()
        is_decode = all(item.num_new_tokens == 1 for item in batch.items)
        if is_decode and decode_started is None:
            decode_started = time.perf_counter()
        out = runner.step(batch.to_step_input())
        scheduler.update(batch, dict(zip(out.req_ids, out.token_ids)))
        runner.release(scheduler.take_released())
        decode_steps += is_decode
    ended = time.perf_counter()
    decode_seconds = ended - decode_started
    return {"batch_size": batch_size, "decode_step_ms": decode_seconds / decode_steps * 1000,
            "decode_tokens_per_s": batch_size * decode_steps / decode_seconds,
            "output_tokens_per_s": batch_size * output_tokens / (ended - started),
            "prefill_s": decode_started - started}


def run(model_dir: str, batch_sizes: list[int], prompt_tokens: int, output_tokens: int,
        dtype: torch.dtype = torch.float32) -> list[dict]:
    ckpt = LoadedCheckpoint.open(model_dir)
    largest = max(batch_sizes)
    config = RunnerConfig(num_slots=largest * (prompt_tokens + output_tokens), max_reqs=largest,
                          max_len=prompt_tokens + output_tokens, dtype=dtype)
    runner = ModelRunner(ckpt, config, ImageStore(), show_progress=False)
    measure(runner, 1, 16, 4)  # warm up
    return [measure(runner, size, prompt_tokens, output_tokens) for size in batch_sizes]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--prompt_tokens", type=int, default=300)
    parser.add_argument("--output_tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for row in run(args.model_dir, args.batch_sizes, args.prompt_tokens, args.output_tokens):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
