"""The same workload through transformers' generate() on the same checkpoint: what a user would run
without a server. One request at a time, and in static padded batches (left padding, greedy,
exactly `max_tokens` new tokens each); the best batch is the baseline.

    python -m benchmark.hf_baseline --model_dir DIR --num_requests 64 --batch_sizes 1 8 16 32 64

Times come from a stopping-criteria hook that stamps every generated token, so TTFT and TPOT are
measured the way the server's are: TTFT from the moment the batch starts (requests queued behind
earlier batches also wait for those), TPOT over the tokens after the first.
"""

import argparse
import base64
import io
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration
from transformers import InternVLProcessor as HFInternVLProcessor
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from benchmark.serve import percentiles
from benchmark.workloads import BenchRequest, build


class ImageOnlyProcessor(HFInternVLProcessor):
    """InternVLProcessor without its video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **kwargs)


def load(model_dir: str, dtype: torch.dtype = torch.float32):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    config = json.loads(Path(model_dir, "processor_config.json").read_text())
    processor = ImageOnlyProcessor(GotOcr2ImageProcessorPil.from_pretrained(model_dir), tokenizer,
                                   image_seq_length=config["image_seq_length"], chat_template=tokenizer.chat_template)
    model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    return processor, model


def to_hf(messages: list[dict]) -> list[dict]:
    """OpenAI image_url parts (data: URLs) -> transformers' {"type": "image", "image": PIL}."""
    converted = []
    for m in messages:
        if isinstance(m["content"], str):
            converted.append(m)
            continue
        parts = []
        for part in m["content"]:
            if part["type"] == "image_url":
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                parts.append({"type": "image", "image": Image.open(io.BytesIO(data))})
            else:
                parts.append(part)
        converted.append({**m, "content": parts})
    return converted


class Stamps(StoppingCriteria):
    """Records the time each generation step ends; never stops anything."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@torch.inference_mode()
def run_batches(processor, model, requests: list[BenchRequest], batch_size: int) -> dict:
    """Process all requests in static batches of `batch_size`, one batch after another. A batch runs
    until its longest request is done (generate() has one length per batch); only the tokens each
    request asked for count as output."""
    ttft, tpot, output_tokens = [], [], 0
    started = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        inputs = processor.apply_chat_template([to_hf(r.messages) for r in batch], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt",
                                               processor_kwargs={"padding": True})
        new_tokens = max(r.max_tokens for r in batch)
        stamps = Stamps()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([stamps]))
        produced = out.shape[1] - inputs["input_ids"].shape[1]
        output_tokens += sum(r.max_tokens for r in batch)
        first = stamps.times[0] - started
        per_token = (stamps.times[-1] - stamps.times[0]) / max(1, produced - 1)
        ttft += [first] * len(batch)
        tpot += [per_token] * len(batch)
    elapsed = time.perf_counter() - started
    return {"batch_size": batch_size, "requests": len(requests), "duration_s": elapsed,
            "requests_per_s": len(requests) / elapsed, "output_tokens": output_tokens,
            "output_tokens_per_s": output_tokens / elapsed, "ttft_s": percentiles(ttft),
            "tpot_s": percentiles(tpot)}


def combine_single(results: list[dict]) -> dict:
    """One summary over requests run one at a time by run_batches(..., [request], 1), each timed from its
    own start (W2's reference)."""
    return {"batch_size": 1, "requests": len(results),
            "duration_s": sum(r["duration_s"] for r in results),
            "output_tokens_per_s": sum(r["output_tokens"] for r in results) / sum(r["duration_s"] for r in results),
            "ttft_s": percentiles([r["ttft_s"]["p50"] for r in results]),
            "tpot_s": percentiles([r["tpot_s"]["p50"] for r in results]),
            "e2e_s": {"mean": statistics.fmean(r["duration_s"] for r in results)}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--num_requests", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--output_tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--data_type", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    processor, model = load(args.model_dir, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.data_type])
    requests = build(args.num_requests, output_tokens=args.output_tokens)
    for size in args.batch_sizes:
        print(json.dumps(run_batches(processor, model, requests, size)))


if __name__ == "__main__":
    main()
