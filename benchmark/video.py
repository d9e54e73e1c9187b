"""W6, video: short clips through a running server, and what a video costs on its way there.

    python -m benchmark.video --url http://127.0.0.1:8000 [--num_requests 12 --concurrency 4]
    python -m benchmark.video --io          # decode, sample, shared-memory and pixel costs, no server

The workload: `num_requests` clips, each new (photos panned for 2 s at 8 fps, 320x240, H.264 made with
PyAV), sampled to 4 frames by `num_frames`, at concurrency 4, streaming; then one clip alone twice,
the second time an embedding-cache hit (TTFT of the miss and of the hit). `--io` times each step of a
longer clip (10 s, 30 fps, 640x360): the numbers behind sending sampled frames to the encoder in shared
memory rather than the file for the encoder to decode again (docs/architecture.md).
"""

import argparse
import asyncio
import base64
import io
import json
import random
import time

import av
import numpy as np
from PIL import Image

from benchmark.serve import run, summarize, table
from benchmark.workloads import PHOTO_NAMES, PHOTOS, BenchRequest, prompt_text


def make_clip(index: int, size=(320, 240), seconds: float = 2.0, fps: int = 8) -> bytes:
    """A distinct H.264 clip per index: a window panning over one photo, then another."""
    rng = random.Random(index)
    photos = [Image.open(PHOTOS / PHOTO_NAMES[(index + k) % len(PHOTO_NAMES)]).convert("RGB") for k in (0, 1)]
    num_frames = int(seconds * fps)
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        dx, dy = rng.randint(2, 9), rng.randint(1, 5)
        for i in range(num_frames):
            photo = photos[2 * i // num_frames]
            w, h = photo.size
            box = (dx * i % (w // 3), dy * i % (h // 3), dx * i % (w // 3) + 2 * w // 3, dy * i % (h // 3) + 2 * h // 3)
            frame = av.VideoFrame.from_ndarray(np.asarray(photo.crop(box).resize(size)), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return out.getvalue()


def video_request(clip: bytes, words: int, output_tokens: int, rng: random.Random, num_frames: int,
                  repeated: bool = False) -> BenchRequest:
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    content = [{"type": "video_url", "video_url": {"url": url, "num_frames": num_frames}},
               {"type": "text", "text": prompt_text(words, rng)}]
    return BenchRequest([{"role": "user", "content": content}], output_tokens, repeated=repeated, tag="video")


def build_videos(num_requests: int, num_frames: int = 4, output_tokens: int = 32, seed: int = 6) -> list:
    rng = random.Random(seed)
    return [video_request(make_clip(seed * 1000 + i), 16, output_tokens, rng, num_frames) for i in range(num_requests)]


def workload(url: str, num_requests: int = 12, concurrency: int = 4, num_frames: int = 4, seed: int = 6) -> dict:
    """W6: new clips at `concurrency`, then one clip twice alone (a miss, then a cache hit)."""
    results, elapsed = asyncio.run(run(url, build_videos(num_requests, num_frames, seed=seed), concurrency,
                                       progress=False))
    summary = summarize(results, elapsed)
    rng = random.Random(seed + 1)
    clip = make_clip(seed * 1000 + 999)
    pair = [video_request(clip, 16, 32, rng, num_frames), video_request(clip, 16, 32, rng, num_frames, True)]
    ttft = []
    for request in pair:  # one after the other: the second finds every frame's rows in the cache
        (result,), _ = asyncio.run(run(url, [request], 1, progress=False))
        ttft.append(result.ttft if result.ok else None)
    summary["ttft_miss_s"], summary["ttft_hit_s"] = ttft
    return summary


def io_costs(seconds: float = 10.0, fps: int = 30, size=(640, 360), num_frames: int = 16) -> dict:
    """Seconds for each step of a video's way to the encoder, and the bytes each step moves."""
    from lightvlm.common import shm
    from lightvlm.common.video import read_video

    clip = make_clip(7, size, seconds, fps)
    every = int(seconds * fps)
    sample = lambda total, rate: tuple(range(0, total, total // num_frames))[:num_frames]  # noqa: E731
    costs = {"file_bytes": len(clip), "frames_total": every, "frames_sampled": num_frames}
    started = time.perf_counter()
    with av.open(io.BytesIO(clip)) as container:
        costs["packets"] = sum(1 for p in container.demux(video=0) if p.size)
    costs["demux_count_s"] = time.perf_counter() - started
    started = time.perf_counter()
    with av.open(io.BytesIO(clip)) as container:
        for _ in container.decode(video=0):
            pass
    costs["decode_all_s"] = time.perf_counter() - started
    started = time.perf_counter()
    video = read_video(clip, sample)
    costs["decode_and_sample_rgb_s"] = time.perf_counter() - started
    costs["sampled_rgb_bytes"] = video.frames.nbytes
    name = f"lvlmbench_{time.time_ns()}"
    started = time.perf_counter()
    size_written = shm.write_media(name, video.frames)
    costs["shm_write_s"] = time.perf_counter() - started
    started = time.perf_counter()
    frames = shm.read_media(name, size_written)
    costs["shm_read_s"] = time.perf_counter() - started
    shm.unlink(name)
    assert np.array_equal(frames, video.frames)
    return costs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--num_requests", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--num_frames", type=int, default=4, help="frames sampled from each clip")
    parser.add_argument("--io", action="store_true", help="time decoding and the hand-over instead (no server)")
    args = parser.parse_args(argv)
    if args.io:
        print(json.dumps(io_costs(), indent=1))
        return
    summary = workload(args.url, args.num_requests, args.concurrency, args.num_frames)
    print(table(summary))
    print(f"one clip alone: TTFT {summary['ttft_miss_s'] * 1e3:.0f} ms (miss), "
          f"{summary['ttft_hit_s'] * 1e3:.0f} ms (hit)")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
