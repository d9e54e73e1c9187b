"""Load generator: drives a running lightvlm (or any OpenAI-compatible) server and reports latency.

    python -m benchmark.serve --url http://127.0.0.1:8000 --num_requests 64 --concurrency 64 \\
        --images_per_request 1 --image_size 448 --output_tokens 128

Streams every request (OpenAI chat with `stream_options.include_usage`, or native /generate_stream)
and reports TTFT, TPOT (per request: (E2E - TTFT) / (tokens - 1)), inter-token latency and end-to-end
latency at p50/p90/p99, requests/s and output tokens/s, as JSON and as a table.
"""

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import aiohttp
from tqdm import tqdm

from benchmark.workloads import BenchRequest, build


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    repeated: bool = False
    tag: str = ""
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def chat_request(session: aiohttp.ClientSession, url: str, request: BenchRequest, api: str) -> Result:
    if api == "chat":
        body = {"messages": request.messages, "max_tokens": request.max_tokens, "stream": True,
                "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
        endpoint = url + "/v1/chat/completions"
    else:
        body = native_body(request)
        endpoint = url + "/generate_stream"
    start = time.perf_counter()
    last, result = start, Result(ok=False, repeated=request.repeated, tag=request.tag)
    try:
        async with session.post(endpoint, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                data = json.loads(line[5:])
                now = time.perf_counter()
                tokens = count_tokens(data, api)
                if data.get("usage"):
                    result.output_tokens = data["usage"]["completion_tokens"]
                    result.prompt_tokens = data["usage"]["prompt_tokens"]
                if tokens:
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    if api != "chat":
                        result.output_tokens += tokens
                        result.prompt_tokens = data["token"]["prompt_tokens"]
        result.e2e = time.perf_counter() - start
        result.ok = True
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def count_tokens(data: dict, api: str) -> int:
    if api == "chat":  # the opening chunk only carries the role; every later chunk is one token
        return sum(1 for c in data.get("choices", []) if "role" not in c.get("delta", {}))
    return 1 if "token" in data else 0


def native_body(request: BenchRequest) -> dict:
    """The same request for /generate_stream: ChatML prompt with <image> placeholders."""
    prompt, images = "", []
    for message in request.messages:
        content = message["content"]
        if isinstance(content, list):
            text = ""
            for part in content:
                if part["type"] == "image_url":
                    text += "<image>\n"
                    images.append({"type": "base64", "data": part["image_url"]["url"].split(",", 1)[1]})
                else:
                    text += part["text"]
            content = text
        prompt += f"<|im_start|>{message['role']}\n{content}<|im_end|>\n"
    prompt += "<|im_start|>assistant\n"
    return {"inputs": prompt, "multimodal_params": {"images": images},
            "parameters": {"max_new_tokens": request.max_tokens, "ignore_eos": True, "min_new_tokens": 1}}


async def run(url: str, requests: list[BenchRequest], concurrency: int | None = None, rate: float | None = None,
              api: str = "chat", progress: bool = True, seed: int = 0) -> tuple[list[Result], float]:
    """Send every request (at most `concurrency` at once, or Poisson arrivals at `rate` per second)."""
    limit = asyncio.Semaphore(concurrency or len(requests))
    rng = random.Random(seed)
    bar = tqdm(total=len(requests), desc="requests", disable=not progress, leave=False)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(request: BenchRequest) -> Result:
            async with limit:
                result = await chat_request(session, url, request, api)
            bar.update(1)
            return result

        started = time.perf_counter()
        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(one(request)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    bar.close()
    return results, elapsed


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def at(q):
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"mean": statistics.fmean(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarize(results: list[Result], elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "failed": len(results) - len(ok), "duration_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed else 0.0,
        "output_tokens": output, "output_tokens_per_s": output / elapsed if elapsed else 0.0,
        "prompt_tokens_mean": statistics.fmean([r.prompt_tokens for r in ok]) if ok else 0,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": percentiles([gap for r in ok for gap in r.itl]),
        "e2e_s": percentiles([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def table(summary: dict) -> str:
    rows = [f"requests {summary['requests']} (failed {summary['failed']}) in {summary['duration_s']:.1f} s: "
            f"{summary['requests_per_s']:.2f} req/s, {summary['output_tokens_per_s']:.1f} output tok/s"]
    rows.append(f"{'metric':<8}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}   (ms)")
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        cells = [summary[name][k] for k in ("mean", "p50", "p90", "p99")]
        rows.append(f"{name[:-2].upper():<8}" + "".join(f"{c * 1000:>10.1f}" if c is not None else f"{'-':>10}"
                                                        for c in cells))
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api", choices=["chat", "generate"], default="chat")
    parser.add_argument("--num_requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: all)")
    parser.add_argument("--request_rate", type=float, default=None, help="Poisson arrivals per second instead")
    parser.add_argument("--images_per_request", type=int, default=1, choices=range(0, 5))
    parser.add_argument("--image_size", type=int, nargs="+", default=[448], help="W [H] in pixels")
    parser.add_argument("--repeat_share", type=float, default=0.0, help="share of requests reusing a pool image")
    parser.add_argument("--pool_size", type=int, default=8)
    parser.add_argument("--prompt_words", type=int, default=24, help="text words per turn (~1.3 tokens each)")
    parser.add_argument("--output_tokens", type=int, default=128, help="generated with ignore_eos")
    parser.add_argument("--multi_turn", action="store_true", help="two earlier turns with images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the summary here")
    args = parser.parse_args(argv)
    size = tuple(args.image_size * 2)[:2] if len(args.image_size) == 1 else tuple(args.image_size[:2])
    requests = build(args.num_requests, args.images_per_request, size, args.repeat_share, args.pool_size,
                     args.prompt_words, args.output_tokens, args.multi_turn, args.seed)
    results, elapsed = asyncio.run(run(args.url, requests, args.concurrency, args.request_rate, args.api))
    summary = summarize(results, elapsed)
    print(table(summary))
    text = json.dumps({"args": vars(args), "summary": summary,
                       "results": [asdict(r) for r in results]}, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
