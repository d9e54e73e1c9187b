"""Load and soak runs against a real server on loopback (make targets, not in CI).

    python -m benchmark.load_soak load [--requests 256] [--out DIR]
    python -m benchmark.load_soak soak [--seconds 1800] [--interval 30] [--concurrency 16] [--out DIR]

Both start the server on the `tiny` InternVL demo checkpoint (built once into a temporary folder, or
`--model_dir`) and send mixed traffic: native and OpenAI, streamed and not, with and without an
image, and a share of clients that go away (before the answer, or mid-stream after a few events).

- `load`: `--requests` at once. Every client that stays gets a complete answer (HTTP 200, the stream
  ending in its last event); afterwards nothing is in flight (`lightvlm_requests_in_flight` 0), no
  image-bytes segment is left in /dev/shm, `/health` is 200; then SIGTERM, and no process or segment
  of the instance is left.
- `soak`: `--concurrency` clients for `--seconds`; every `--interval` seconds a sample of the server's
  RSS (all its processes) and its /dev/shm bytes, so that a leak shows as growth; the same checks at
  the end.

Writes `report.json` and `report.md` to `--out` and exits non-zero when a check fails.
"""

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from PIL import Image

SHM = Path("/dev/shm")
PROMPT = "<|im_start|>user\n{image}Describe what you see in a few words.<|im_end|>\n<|im_start|>assistant\n"
KINDS = ("native", "native_stream", "chat", "chat_stream", "leave_early", "leave_mid_stream")


@dataclass
class Tally:
    sent: int = 0
    complete: int = 0
    left: int = 0  # clients that went away on purpose
    failed: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_of(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [pid], [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        found += kids
        frontier += kids
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        total += int(match.group(1)) * 1024 if match else 0
    return total


class Server:
    def __init__(self, model_dir: str, out: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = out / "server.log"
        self.log = open(self.log_path, "w+")  # noqa: SIM115 (lives with the server)
        command = [sys.executable, "-m", "lightvlm.server.api_server", "--enable_multimodal", "--model_dir",
                   model_dir, "--port", str(self.port), "--max_req_total_len", "2048", "--running_max_req_size",
                   "64", "--graceful_shutdown_timeout", "5"]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        self.instance = ""

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited; see {self.log_path}")
            try:
                async with session.get(self.url + "/health") as response:
                    if response.status == 200:
                        match = re.search(r"instance (\w+),", self.log_path.read_text())
                        self.instance = match.group(1) if match else ""
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
        raise TimeoutError("the server did not become ready")

    def segments(self) -> list[Path]:
        return list(SHM.glob(f"lvlm{self.instance}_*")) if self.instance else []

    def shm_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.segments() if p.exists())

    def stop(self) -> tuple[int, list[int]]:
        pids = processes_of(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        self.log.close()
        deadline = time.monotonic() + 10  # rooms the launcher stopped may take a moment to be reaped
        while time.monotonic() < deadline and any(map(is_running, pids)):
            time.sleep(0.2)
        return code, [p for p in pids if is_running(p)]


def image_b64(rng: random.Random) -> str:
    size = rng.choice([(224, 224), (448, 336), (640, 480)])
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return base64.b64encode(out.getvalue()).decode()


def request_for(kind: str, rng: random.Random, model: str) -> tuple[str, dict, bool]:
    """(path, body, streamed) for one client of `kind`."""
    image = image_b64(rng) if rng.random() < 0.5 else None
    tokens = rng.randint(4, 48)
    streamed = kind.endswith("stream") or kind.startswith("leave")
    if kind.startswith("native") or (kind.startswith("leave") and rng.random() < 0.5):
        body = {"inputs": PROMPT.format(image="<img></img>\n" if image else ""),
                "parameters": {"max_new_tokens": tokens, "ignore_eos": True},
                "multimodal_params": {"images": [{"type": "base64", "data": image}] if image else []}}
        return ("/generate_stream" if streamed else "/generate"), body, streamed
    content = [{"type": "text", "text": "Describe what you see in a few words."}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + image}})
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "ignore_eos": True, "stream": streamed}
    return "/v1/chat/completions", body, streamed


async def client(session: aiohttp.ClientSession, url: str, model: str, rng: random.Random, tally: Tally) -> None:
    kind = rng.choice(KINDS)
    path, body, streamed = request_for(kind, rng, model)
    tally.sent += 1
    try:
        if kind == "leave_early":
            task = asyncio.ensure_future(session.post(url + path, json=body))
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                (await task).release()  # it was answered before we left
            tally.left += 1
            return
        async with session.post(url + path, json=body) as response:
            if response.status != 200:
                tally.failed.append(f"{kind}: HTTP {response.status} {(await response.text())[:200]}")
                return
            if not streamed:
                data = await response.json()
                if not (data.get("generated_text") or data.get("choices")):
                    tally.failed.append(f"{kind}: no answer in {str(data)[:200]}")
                    return
                tally.complete += 1
                return
            events, last = 0, ""
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                events, last = events + 1, line
                if kind == "leave_mid_stream" and events >= rng.randint(1, 4):
                    tally.left += 1
                    return  # leaving the context closes the connection mid-stream
            finished = last == "data: [DONE]" or '"finished": true' in last or '"finished":true' in last
            if "error" in last or not finished:
                tally.failed.append(f"{kind}: stream ended with {last[:200]!r}")
                return
            tally.complete += 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        tally.failed.append(f"{kind}: {type(e).__name__} {e}")


async def in_flight(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    match = re.search(r"^lightvlm_requests_in_flight(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


async def settle(session: aiohttp.ClientSession, server: Server, timeout: float = 60) -> dict:
    """Wait for the server to go idle; what is left then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flying = await in_flight(session, server.url)
        media = [p.name for p in server.segments() if re.search(r"_b\d+_\d+$", p.name)]
        if flying == 0 and not media:
            break
        await asyncio.sleep(0.5)
    async with session.get(server.url + "/health") as response:
        health = response.status
    return {"in_flight": flying, "media_segments_left": media, "health": health}


async def run(args) -> dict:
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or build_tiny(out)
    server = Server(model_dir, out)
    tally, samples = Tally(), []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        try:
            await server.wait_ready(session)
            async with session.get(server.url + "/get_model_name") as response:
                model = (await response.json())["model_name"]
            start = time.monotonic()
            if args.mode == "load":
                await asyncio.gather(*(client(session, server.url, model, random.Random(rng.random()), tally)
                                       for _ in range(args.requests)))
            else:
                stop_at = start + args.seconds

                async def worker(seed: float):
                    local = random.Random(seed)
                    while time.monotonic() < stop_at:
                        await client(session, server.url, model, local, tally)

                async def sampler():
                    pids = processes_of(server.process.pid)
                    while time.monotonic() < stop_at:
                        samples.append({"t": round(time.monotonic() - start, 1), "rss_mib": rss_bytes(pids) / 2**20,
                                        "shm_mib": server.shm_bytes() / 2**20, "sent": tally.sent,
                                        "failed": len(tally.failed)})
                        await asyncio.sleep(args.interval)

                await asyncio.gather(sampler(), *(worker(rng.random()) for _ in range(args.concurrency)))
            elapsed = time.monotonic() - start
            after = await settle(session, server)
        finally:
            code, survivors = server.stop()
    left = [p.name for p in server.segments()]
    report = {"mode": args.mode, "elapsed_s": round(elapsed, 1), **asdict(tally), "failed": tally.failed[:50],
              "num_failed": len(tally.failed), **after, "exit_code": code, "processes_left": survivors,
              "segments_left_after_stop": left, "samples": samples}
    report["ok"] = (not tally.failed and after["in_flight"] == 0 and not after["media_segments_left"]
                    and after["health"] == 200 and code == 0 and not survivors and not left)
    return report


def build_tiny(out: Path) -> str:
    from lightvlm.models.demo import build_demo_checkpoint
    folder = Path(tempfile.mkdtemp(prefix="lvlm-soak-", dir=out))
    build_demo_checkpoint(folder, arch="internvl", size="tiny")
    return str(folder)


def markdown(report: dict) -> str:
    lines = [f"# {report['mode']}: {'ok' if report['ok'] else 'FAILED'}", "",
             f"- {report['sent']} requests in {report['elapsed_s']} s: {report['complete']} complete, "
             f"{report['left']} clients left on purpose, {report['num_failed']} failed",
             f"- after the traffic: in flight {report['in_flight']}, image segments left "
             f"{len(report['media_segments_left'])}, /health {report['health']}",
             f"- after SIGTERM: exit code {report['exit_code']}, processes left {report['processes_left']}, "
             f"segments left {report['segments_left_after_stop']}"]
    if report["samples"]:
        lines += ["", "| t (s) | RSS (MiB) | /dev/shm (MiB) | sent | failed |", "|---|---|---|---|---|"]
        lines += [f"| {s['t']} | {s['rss_mib']:.0f} | {s['shm_mib']:.1f} | {s['sent']} | {s['failed']} |"
                  for s in report["samples"]]
    lines += [""] + [f"- {f}" for f in report["failed"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["load", "soak"])
    parser.add_argument("--requests", type=int, default=256, help="load: clients at once")
    parser.add_argument("--seconds", type=float, default=1800, help="soak: how long")
    parser.add_argument("--interval", type=float, default=30, help="soak: seconds between samples")
    parser.add_argument("--concurrency", type=int, default=16, help="soak: clients at once")
    parser.add_argument("--model_dir", default=None, help="default: the tiny InternVL demo, built here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="soak_out")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    out = Path(args.out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
