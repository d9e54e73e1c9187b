"""CUDA graphs for decode against the op-by-op forward, on the demo checkpoint (a part of `make gpu-check`).

    python -m benchmark.graph_check

Two in-process pipelines on CUDA in fp32, one replaying captured decode graphs (the default), one with
`cuda_graph=False`, generate the same greedy requests: 16 at once (a captured size) and 5 (padded to
8). Prints the tokens' agreement and each side's output tokens per second; exits 1 if the tokens
differ. Needs CUDA, torch and triton; nothing is downloaded.
"""

import sys
import time

import torch

from lightvlm.models.demo import demo_checkpoint
from lightvlm.pipeline import GenerationConfig, pipeline

CONFIG = GenerationConfig(max_new_tokens=32, ignore_eos=True)


def generate(pipe, prompts: list[str]) -> tuple[list[list[int]], float]:
    pipe(prompts[:1], CONFIG)  # warm up
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = pipe(prompts, CONFIG)
    torch.cuda.synchronize()
    return [r.token_ids for r in out], len(prompts) * CONFIG.max_new_tokens / (time.perf_counter() - started)


def main() -> int:
    if not torch.cuda.is_available():
        print("graph_check needs a CUDA GPU", file=sys.stderr)
        return 2
    model_dir = demo_checkpoint()
    sides = {name: pipeline(model_dir, max_batch_size=16, session_len=512, data_type="fp32", device="cuda",
                            cuda_graph=name == "graphs") for name in ("graphs", "eager")}
    ok = True
    for batch in (16, 5):
        prompts = [f"Tell me story number {i} about a cat." for i in range(batch)]
        (graph_ids, graph_rate), (eager_ids, eager_rate) = (generate(sides[n], prompts) for n in ("graphs", "eager"))
        same = graph_ids == eager_ids
        ok &= same
        print(f"batch {batch}: tokens {'equal' if same else 'DIFFER'}; graphs {graph_rate:.0f} tok/s, "
              f"op by op {eager_rate:.0f} tok/s ({graph_rate / eager_rate:.2f}x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
