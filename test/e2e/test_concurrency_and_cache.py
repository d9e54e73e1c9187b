"""Many requests at once, the embedding cache, and disconnects, on the real server."""

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import PngImagePlugin

from helpers import image_bytes, load_image
from server import wait_for

NAMES = ["coffee.jpg", "chelsea.png", "rocket.jpg", "camera_gray.png", "coffee_strip_600x40.jpg",
         "astronaut_10x10.png", "chelsea_rgba.png", "coffee.webp"]
TEXTS = ["Hi.", "Describe this image in detail, please.", "What is it?", "Count the objects in it and name them.",
         "Read the text.", "Where was this taken?", "A", "What colors do you see here?"]


def chat(text, with_image):
    image = "<img></img>\n" if with_image else ""
    return f"<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n"


def body(i):
    with_image = i % 4 != 3  # every fourth is text only
    images = [{"type": "base64", "data": base64.b64encode(image_bytes(NAMES[i % 5])).decode()}] if with_image else []
    return {"inputs": chat(TEXTS[i % len(TEXTS)], with_image),
            "parameters": {"max_new_tokens": 6 + (i * 7) % 30, "min_new_tokens": 0, "return_details": True},
            "multimodal_params": {"images": images}}


def ids(response):
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["tokens"]]


def test_32_concurrent_requests_get_the_tokens_they_get_alone(main_server):
    bodies = [body(i) for i in range(32)]
    alone = [ids(main_server.post("/generate", b)) for b in bodies]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda b: ids(main_server.post("/generate", b)), bodies))
    assert together == alone
    load = wait_for(lambda: (lambda r: r if r["running_requests"] == 0 and r["kv_slots_used"] == 0 else None)(
        main_server.get("/token_load").json()))
    assert load, "KV slots still held after every request finished"


def cache_stats(server):
    return server.get("/token_load").json()


def settled_stats(server):
    """Stats travel from the visualserver about ten times a second: read them once they stop moving."""
    time.sleep(0.3)
    return cache_stats(server)


def unique_png(name: str, tag: str) -> str:
    """The photo as a PNG carrying a text chunk no other test sends: bytes the cache has never seen."""
    out = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("test", f"{tag}-{time.time_ns()}")
    load_image(name).convert("RGB").save(out, format="PNG", pnginfo=info)
    return base64.b64encode(out.getvalue()).decode()


def image_request(data: str, max_new_tokens: int = 16) -> dict:
    return {"inputs": chat("What is in this picture?", True),
            "parameters": {"max_new_tokens": max_new_tokens, "min_new_tokens": 0, "return_details": True},
            "multimodal_params": {"images": [{"type": "base64", "data": data}]}}


def test_repeated_image_skips_the_encoder_and_gives_identical_tokens(main_server):
    request = image_request(unique_png("astronaut.jpg", "repeat"))
    before = settled_stats(main_server)
    first = ids(main_server.post("/generate", request))
    middle = settled_stats(main_server)
    second = ids(main_server.post("/generate", request))
    after = settled_stats(main_server)
    assert middle["images_encoded"] == before["images_encoded"] + 1
    assert middle["embed_cache_misses"] == before["embed_cache_misses"] + 1
    assert after["images_encoded"] == middle["images_encoded"], "the vision encoder ran for a cached image"
    assert after["embed_cache_hits"] == middle["embed_cache_hits"] + 1
    assert second == first


def test_different_images_never_share_an_embedding(main_server):
    before = settled_stats(main_server)
    a = ids(main_server.post("/generate", image_request(unique_png("coffee.jpg", "a"), 24)))
    b = ids(main_server.post("/generate", image_request(unique_png("chelsea.png", "b"), 24)))
    after = settled_stats(main_server)
    assert after["embed_cache_misses"] == before["embed_cache_misses"] + 2
    assert after["embed_cache_hits"] == before["embed_cache_hits"]
    assert a != b


def test_client_disconnecting_mid_stream_frees_kv_and_image_references(main_server):
    request = {"inputs": chat("Tell me everything about this image.", True),
               "parameters": {"max_new_tokens": 1500, "min_new_tokens": 1500, "ignore_eos": True},
               "multimodal_params": {"images": [{"type": "base64", "data": base64.b64encode(
                   image_bytes("rocket.jpg")).decode()}]}}
    with requests.post(main_server.url + "/generate_stream", json=request, stream=True, timeout=60) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(10)) if line]
        busy = cache_stats(main_server)
    assert received, "no tokens streamed"
    disconnected = time.monotonic()
    assert busy["kv_slots_used"] > 0 or busy["running_requests"] > 0
    freed = wait_for(lambda: (lambda s: s["kv_slots_used"] == 0 and s["running_requests"] == 0
                              and s["embed_cache_held_entries"] == 0)(cache_stats(main_server)), timeout=2.0)
    assert freed, f"still held {time.monotonic() - disconnected:.1f} s after the disconnect: {cache_stats(main_server)}"


def test_client_leaving_a_non_streamed_n3_request_frees_all_three(main_server):
    request = {"inputs": chat("Write a long story.", False),
               "parameters": {"max_new_tokens": 1500, "min_new_tokens": 1500, "ignore_eos": True, "n": 3,
                              "do_sample": True}}
    with pytest.raises(requests.exceptions.Timeout):
        requests.post(main_server.url + "/generate", json=request, timeout=1.5)
    freed = wait_for(lambda: (lambda s: s["kv_slots_used"] == 0 and s["running_requests"] == 0)(
        cache_stats(main_server)), timeout=2.0)
    assert freed, f"still held after the client left: {cache_stats(main_server)}"
    assert main_server.get("/health").status_code == 200


def test_the_same_image_twice_in_one_request_keeps_other_users_reference(main_server):
    data = unique_png("rocket.jpg", "twice")
    long_one = {"inputs": chat("Describe it at length.", True),
                "parameters": {"max_new_tokens": 1500, "min_new_tokens": 1500, "ignore_eos": True},
                "multimodal_params": {"images": [{"type": "base64", "data": data}]}}
    twice = {"inputs": "<|im_start|>user\n<image><image>Same twice?<|im_end|>\n<|im_start|>assistant\n",
             "parameters": {"max_new_tokens": 4},
             "multimodal_params": {"images": [{"type": "base64", "data": data}] * 2}}
    with requests.post(main_server.url + "/generate_stream", json=long_one, stream=True, timeout=60) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line)  # the long request is decoding, holding the image
        assert main_server.post("/generate", twice).status_code == 200
        time.sleep(0.3)
        assert cache_stats(main_server)["embed_cache_held_entries"] == 1  # still held by the long request
    assert wait_for(lambda: cache_stats(main_server)["embed_cache_held_entries"] == 0, timeout=2.0)
