"""Requests for the benchmarks: real photos at a chosen size, some repeated, prompts of a chosen
length, optional multi-turn histories (two earlier turns with images, as in DashInfer-VLM's benchmark).

Everything is deterministic for a given seed, so lightvlm and transformers see the same requests.
"""

import base64
import io
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image

PHOTOS = Path(__file__).resolve().parents[1] / "test" / "fixtures" / "images"
PHOTO_NAMES = ["astronaut.jpg", "coffee.jpg", "chelsea.png", "rocket.jpg", "camera_gray.png", "coffee.webp"]
CORPUS = Path(__file__).resolve().parents[1] / "lightvlm" / "models" / "demo_corpus.txt"


@dataclass
class BenchRequest:
    messages: list[dict]  # OpenAI chat messages (images as data: URLs)
    max_tokens: int
    image_ids: list[int] = field(default_factory=list)  # which pool images it uses
    repeated: bool = False  # its image was sent before (a cache hit for the server)
    tag: str = ""  # "probe" for W4's text-only probes


def make_image(index: int, size: tuple[int, int]) -> bytes:
    """A distinct JPEG per index: a photo, cropped by the index and resized to `size`."""
    photo = Image.open(PHOTOS / PHOTO_NAMES[index % len(PHOTO_NAMES)]).convert("RGB")
    rng = random.Random(index)
    w, h = photo.size
    left, top = rng.randint(0, w // 8), rng.randint(0, h // 8)
    crop = photo.crop((left, top, w - rng.randint(0, w // 8), h - rng.randint(0, h // 8))).resize(size)
    out = io.BytesIO()
    crop.save(out, format="JPEG", quality=90)
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


@lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    return tuple(CORPUS.read_text().split())


def prompt_text(words: int, rng: random.Random) -> str:
    vocabulary = corpus_words()
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def user_turn(text: str, images: list[bytes]) -> dict:
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def build(num_requests: int, images_per_request: int = 1, image_size: tuple[int, int] = (448, 448),
          repeat_share: float = 0.0, pool_size: int = 8, prompt_words: int = 24, output_tokens: int = 128,
          multi_turn: bool = False, seed: int = 0, tag: str = "",
          output_range: tuple[int, int] | None = None) -> list[BenchRequest]:
    """`repeat_share` of the requests reuse an image from a pool of `pool_size`; the others get a
    fresh image each. ~24 words make ~32 tokens with the demo tokenizer. `output_range` (lo, hi) draws
    each request's output length uniformly from lo..hi instead of `output_tokens` (the same prompts
    and images as without it)."""
    rng = random.Random(seed)
    lengths = random.Random(seed + 1)
    pool_cache: dict[int, bytes] = {}
    seen: set[int] = set()

    def image_for(index: int) -> bytes:  # pool images are the seed's own: no workload warms another's cache
        if index not in pool_cache:
            pool_cache[index] = make_image(10**9 + seed * 1000 + index if index < pool_size else index, image_size)
        return pool_cache[index]

    fresh = 10_000 + seed * 100_000
    requests = []
    for _ in range(num_requests):
        ids, repeated = [], False
        for _ in range(images_per_request):
            if rng.random() < repeat_share:
                index = rng.randrange(pool_size)
                repeated = repeated or index in seen
            else:
                index, fresh = fresh, fresh + 1
            ids.append(index)
            seen.add(index)
        images = [image_for(i) for i in ids]
        messages = []
        if multi_turn:  # two earlier turns that show pool images again
            for _ in range(2):
                messages.append(user_turn(prompt_text(prompt_words // 2, rng), [image_for(rng.randrange(pool_size))]))
                messages.append({"role": "assistant", "content": prompt_text(12, rng)})
        messages.append(user_turn(prompt_text(prompt_words, rng), images))
        length = lengths.randint(*output_range) if output_range else output_tokens
        requests.append(BenchRequest(messages, length, ids, repeated, tag))
    return requests
