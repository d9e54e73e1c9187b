"""CUDA graphs for decode against the op-by-op forward, on the demo checkpoint (a part of `make gpu-check`).

    python -m benchmark.graph_check

Two in-process pipelines on CUDA in fp32, one replaying captured decode graphs (the default), one with
`cuda_graph=False`, generate the same greedy requests: 16 at once (a captured size) and 5 (padded to
8). The session length of 2048 makes the graphs' slot tables wide enough for the split-K decode
kernel at small batches. Prints how many steps replayed a graph, the share of tokens equal on both
sides and each side's output tokens per second; exits 1 if no step replayed a graph or fewer than
90% of the tokens agree (padded and unpadded GEMMs may round differently, and a flipped greedy token
changes the rest of its request). Needs CUDA, torch and triton; nothing is downloaded.
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
    sides = {name: pipeline(model_dir, max_batch_size=16, session_len=2048, data_type="fp32", device="cuda",
                            cuda_graph=name == "graphs") for name in ("graphs", "eager")}
    graphs = sides["graphs"].runner.decode_graphs
    if graphs is None or not graphs.graphs:
        print("no decode graphs were captured", file=sys.stderr)
        return 1
    replays, forward = [], graphs.forward
    graphs.forward = lambda state: replays.append(state.input_ids.shape[0]) or forward(state)
    ok = True
    for batch in (16, 5):
        prompts = [f"Tell me story number {i} about a cat." for i in range(batch)]
        (graph_ids, graph_rate), (eager_ids, eager_rate) = (generate(sides[n], prompts) for n in ("graphs", "eager"))
        pairs = [(a, b) for g, e in zip(graph_ids, eager_ids) for a, b in zip(g, e)]
        agreement = sum(a == b for a, b in pairs) / len(pairs)
        ok &= agreement >= 0.9
        print(f"batch {batch}: {agreement:.1%} of tokens equal; graphs {graph_rate:.0f} tok/s, "
              f"op by op {eager_rate:.0f} tok/s ({graph_rate / eager_rate:.2f}x)")
    print(f"{len(replays)} decode steps replayed a graph (sizes {sorted(set(replays))})")
    return 0 if ok and replays else 1


if __name__ == "__main__":
    sys.exit(main())
