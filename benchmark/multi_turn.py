"""The prefix-cache workloads: W5 multi-turn chat with images, and one long shared system prompt.

W5: `num_sessions` conversations run at once (at most `concurrency` requests in flight); each turn is
sent when the previous answer has arrived, with the whole history (turn 1 shows an image, later turns
ask about it, turn 3 adds another image). Reported per turn: TTFT p50, and for all turns: req/s, the
cache hit rate (cached prompt tokens over prompt tokens, from `usage.prompt_tokens_details`). The
requests the server saw, answers included, are kept so that transformers can be given exactly the
same ones (`replay`, in turn order: a turn's batch needs the previous turn's answers).

Shared system prompt: `num_requests` short questions behind one system prompt of ~`system_words`
words (~1.3 tokens a word with the demo tokenizer), at a given concurrency.
"""

import asyncio
import json
import random
import statistics
import time

import aiohttp

from benchmark.serve import percentiles
from benchmark.workloads import BenchRequest, make_image, prompt_text, user_turn


def sessions(num_sessions: int, turns: int = 3, seed: int = 6, image_size=(448, 448)) -> list[list[dict]]:
    """Each session: a list of user turns (messages). Turn 1 has the session's image; turn 3 (and every
    other turn after it) adds a second one; the rest are text only."""
    rng = random.Random(seed)
    out = []
    for s in range(num_sessions):
        first = make_image(2 * 10**9 + seed * 1000 + s, image_size)
        second = make_image(3 * 10**9 + seed * 1000 + s, image_size)
        session = []
        for t in range(turns):
            images = [first] if t == 0 else [second] if t % 2 == 0 else []
            session.append(user_turn(prompt_text(16, rng), images))
        out.append(session)
    return out


async def one_turn(session: aiohttp.ClientSession, url: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, text, usage = None, [], {}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(piece)
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft": ttft or 0.0, "e2e": time.perf_counter() - start, "answer": "".join(text),
            "prompt_tokens": usage.get("prompt_tokens", 0), "cached_tokens": details.get("cached_tokens", 0) or 0}


async def run_sessions(url: str, conversations: list[list[dict]], concurrency: int, max_tokens: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    by_turn: dict[int, list[dict]] = {}
    replay: dict[int, list[BenchRequest]] = {}
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        async def converse(turns: list[dict]) -> None:
            history = []
            for t, user in enumerate(turns):
                history.append(user)
                async with limit:
                    result = await one_turn(http, url, list(history), max_tokens)
                by_turn.setdefault(t, []).append(result)
                replay.setdefault(t, []).append(BenchRequest(list(history), max_tokens))
                history.append({"role": "assistant", "content": result["answer"]})

        started = time.perf_counter()
        await asyncio.gather(*(converse(turns) for turns in conversations))
        elapsed = time.perf_counter() - started
    everything = [r for results in by_turn.values() for r in results]
    later = [r["ttft"] for t, results in by_turn.items() if t > 0 for r in results]
    return {"requests": len(everything), "duration_s": elapsed, "requests_per_s": len(everything) / elapsed,
            "ttft_s": percentiles([r["ttft"] for r in everything]),
            "ttft_by_turn_p50_s": {t + 1: statistics.median(r["ttft"] for r in results)
                                   for t, results in sorted(by_turn.items())},
            "ttft_turn2plus_p50_s": statistics.median(later),
            "hit_rate": hit_rate(everything),
            "replay": [request for t in sorted(replay) for request in replay[t]]}


def hit_rate(results: list[dict]) -> float:
    return sum(r["cached_tokens"] for r in results) / max(1, sum(r["prompt_tokens"] for r in results))


def w5(url: str, num_sessions: int = 16, turns: int = 3, concurrency: int = 8, max_tokens: int = 32) -> dict:
    return asyncio.run(run_sessions(url, sessions(num_sessions, turns), concurrency, max_tokens))


def shared_system_prompt(num_requests: int = 32, system_words: int = 600, seed: int = 8) -> list[BenchRequest]:
    rng = random.Random(seed)
    system = {"role": "system", "content": prompt_text(system_words, random.Random(seed - 1))}
    return [BenchRequest([system, {"role": "user", "content": prompt_text(12, rng)}], 16) for _ in range(num_requests)]


async def run_requests(url: str, requests: list[BenchRequest], concurrency: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        async def one(request: BenchRequest) -> dict:
            async with limit:
                return await one_turn(http, url, request.messages, request.max_tokens)

        started = time.perf_counter()
        results = await asyncio.gather(*(one(r) for r in requests))
        elapsed = time.perf_counter() - started
    return {"requests": len(results), "duration_s": elapsed, "requests_per_s": len(results) / elapsed,
            "ttft_s": percentiles([r["ttft"] for r in results]),
            "hit_rate": hit_rate(results)}


def system_prompt(url: str, concurrency: int = 8) -> dict:
    return asyncio.run(run_requests(url, shared_system_prompt(), concurrency))
