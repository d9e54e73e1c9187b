"""Where the time goes: operator classes of lightvlm's engine and of transformers on one batch, the
compute roof of this CPU, and the CPU seconds of each server room during a run.

    python -m benchmark.profile --model_dir DIR --data_type bf16

The language model alone, in-process on both sides: `num_requests` text prompts of `prompt_tokens`
tokens decode `output_tokens` tokens each (ignoring EOS) through our ModelRunner and Scheduler, and
through transformers' `generate()` as one static batch, both under torch.profiler. Each operator's
self CPU time goes to a class (GEMM, attention, KV gather/copy, norms/rotary/activations, sampling,
other ops); the wall time no operator accounts for is Python and scheduling. The roof is the
workload's matmul FLOPs (2 x the decoder's parameters x tokens, prefill and decode apart) at the
GEMM throughput this CPU measures at the model's own shapes.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmark.engine_ceiling import measure
from lightvlm.engine.model_runner import ModelRunner, RunnerConfig
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.pipeline import ImageStore

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OP_CLASSES = (  # (class, operator names without "aten::"); the first match wins
    ("GEMM", {"mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "mkldnn_linear"}),
    ("attention", {"_scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_attention", "_softmax",
                   "softmax", "_safe_softmax", "masked_fill_", "masked_fill"}),
    ("KV gather/copy", {"index_select", "index", "_index_put_impl_", "index_copy_", "index_put_", "copy_", "cat",
                        "gather", "scatter_", "to", "_to_copy", "clone", "contiguous"}),
    ("norms/rotary/activations", {"mul", "mul_", "add", "add_", "silu", "silu_", "gelu", "pow", "rsqrt", "mean",
                                  "neg", "sub", "div", "div_", "sigmoid", "embedding", "cos", "sin"}),
    ("sampling", {"argmax", "topk", "sort", "multinomial", "log_softmax", "_log_softmax", "cumsum", "max"}),
)


def op_class(name: str) -> str:
    op = name.removeprefix("aten::")
    return next((cls for cls, names in OP_CLASSES if op in names), "other ops")


def classify(prof, wall: float) -> dict:
    seconds: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            cls = op_class(event.key)
            seconds[cls] = seconds.get(cls, 0.0) + event.self_cpu_time_total / 1e6
    seconds["Python, scheduling"] = max(0.0, wall - sum(seconds.values()))
    return {"wall_s": wall, "seconds": seconds}


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(a, w)
    repeats = max(5, int(4e9 / (2 * m * k * n)))
    started = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(a, w)
    return 2 * m * k * n * repeats / (time.perf_counter() - started) / 1e9


def prompts(num_requests: int, prompt_tokens: int) -> list[list[int]]:
    return [[(100 + 7 * i + j) % 700 + 10 for j in range(prompt_tokens)] for i in range(num_requests)]


def profile_engine(model_dir: str, dtype: torch.dtype, num_requests: int, prompt_tokens: int,
                   output_tokens: int) -> dict:
    ckpt = LoadedCheckpoint.open(model_dir)
    length = prompt_tokens + output_tokens
    runner = ModelRunner(ckpt, RunnerConfig(num_slots=num_requests * length, max_reqs=num_requests, max_len=length,
                                            dtype=dtype), ImageStore(), show_progress=False)
    measure(runner, 1, 16, 4)  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        row = measure(runner, num_requests, prompt_tokens, output_tokens)
        wall = time.perf_counter() - started
    return {**classify(prof, wall), "output_tokens_per_s": row["output_tokens_per_s"], "prefill_s": row["prefill_s"]}


@torch.inference_mode()
def profile_transformers(model_dir: str, dtype: torch.dtype, num_requests: int, prompt_tokens: int,
                         output_tokens: int) -> dict:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).eval()
    ids = torch.tensor(prompts(num_requests, prompt_tokens))
    model.generate(ids[:1, :16], max_new_tokens=4, do_sample=False)  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_tokens,
                       min_new_tokens=output_tokens, do_sample=False)
        wall = time.perf_counter() - started
    return {**classify(prof, wall), "output_tokens_per_s": num_requests * output_tokens / wall}


def roof(model_dir: str, dtype: torch.dtype, num_requests: int, prompt_tokens: int, output_tokens: int) -> dict:
    text = LoadedCheckpoint.open(model_dir).config.text
    hidden, inter, layers = text.hidden_size, text.intermediate_size, text.num_layers
    kv = text.num_kv_heads * text.head_dim
    per_layer = hidden * (text.num_heads * text.head_dim + 2 * kv) + text.num_heads * text.head_dim * hidden \
        + 3 * hidden * inter
    flops_per_token = 2 * per_layer * layers
    prefill_rate = gemm_gflops(2048, hidden, 2 * inter, dtype)
    decode_rate = gemm_gflops(num_requests, hidden, 2 * inter, dtype)
    prefill_flops = flops_per_token * num_requests * prompt_tokens
    decode_flops = flops_per_token * num_requests * output_tokens
    return {"gflops_prefill_shape": prefill_rate, "gflops_decode_shape": decode_rate,
            "prefill_gflop": prefill_flops / 1e9, "decode_gflop": decode_flops / 1e9,
            "roof_s": prefill_flops / 1e9 / prefill_rate + decode_flops / 1e9 / decode_rate}


def room_cpu_seconds(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of every process under `root_pid`, by name (`lvlm-<room>`)."""
    ticks = 100.0  # USER_HZ on Linux
    children = {root_pid}
    for _ in range(3):  # the launcher's children and theirs
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) in children:
                children.add(int(stat.parent.name))
    seconds: dict[str, float] = {}
    for pid in children:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def run(model_dir: str, data_type: str, num_requests: int = 48, prompt_tokens: int = 300,
        output_tokens: int = 64) -> dict:
    dtype = DTYPES[data_type]
    shape = (num_requests, prompt_tokens, output_tokens)
    return {"shape": shape, "engine": profile_engine(model_dir, dtype, *shape),
            "transformers": profile_transformers(model_dir, dtype, *shape), "roof": roof(model_dir, dtype, *shape)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--data_type", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--num_requests", type=int, default=48)
    parser.add_argument("--prompt_tokens", type=int, default=300)
    parser.add_argument("--output_tokens", type=int, default=64)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.model_dir, args.data_type, args.num_requests, args.prompt_tokens, args.output_tokens),
                     indent=1))


if __name__ == "__main__":
    main()
