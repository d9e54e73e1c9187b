"""The prefix cache on the real server: a chat's second turn reports its cached prompt tokens on both
faces and answers as the (uncached) pipeline does; --disable_dynamic_prompt_cache reports none."""

import base64
import json

import pytest
import requests

from lightvlm import GenerationConfig

from conftest import MAIN_ARGS, start, stop_and_check
from helpers import image_bytes

MAX_NEW = 12


@pytest.fixture(scope="module")
def uncached_server(tmp_path_factory, tiny_qwen2):
    server = start(tmp_path_factory, "nocache", tiny_qwen2, *MAIN_ARGS, "--disable_dynamic_prompt_cache")
    yield server
    stop_and_check(server)


def image_part(name):
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(name)}}


def b64(name):
    return base64.b64encode(image_bytes(name)).decode()


def chat(server, messages):
    response = server.post("/v1/chat/completions", {"model": server.model_name, "messages": messages,
                                                     "max_tokens": MAX_NEW, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["choices"][0]["message"]["content"], body["usage"]


def two_turns(server, name):
    turn1 = [{"role": "user", "content": [image_part(name), {"type": "text", "text": "Describe this image."}]}]
    answer1, usage1 = chat(server, turn1)
    turn2 = [*turn1, {"role": "assistant", "content": answer1}, {"role": "user", "content": "And the colors?"}]
    answer2, usage2 = chat(server, turn2)
    return turn2, usage1, answer2, usage2


def test_second_turn_reports_its_cached_prompt_and_answers_as_the_pipeline(main_server, uncached_server, tiny_pipe):
    turn2, usage1, answer2, usage2 = two_turns(main_server, "coffee.jpg")
    assert usage2["prompt_tokens_details"]["cached_tokens"] >= usage1["prompt_tokens"]
    expected = tiny_pipe(turn2, GenerationConfig(max_new_tokens=MAX_NEW))
    assert answer2 == expected.text and usage2["prompt_tokens"] == expected.input_token_len
    _, off1, off_answer2, off2 = two_turns(uncached_server, "coffee.jpg")
    assert off_answer2 == answer2
    assert off1["prompt_tokens_details"]["cached_tokens"] == off2["prompt_tokens_details"]["cached_tokens"] == 0


def native_body(image_name):
    return {"inputs": "<|im_start|>user\n<img></img>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n",
            "parameters": {"max_new_tokens": 4},
            "multimodal_params": {"images": [{"type": "base64", "data": b64(image_name)}]}}


def stream_events(server, body):
    with requests.post(server.url + "/generate_stream", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]


def test_native_faces_report_prompt_cache_len(main_server, uncached_server):
    body = native_body("rocket.jpg")
    first = main_server.post("/generate", body).json()
    again = main_server.post("/generate", body).json()
    assert again["prompt_cache_len"] == again["prompt_tokens"] - 1  # all but the last prompt token
    assert again["generated_text"] == first["generated_text"]
    events = stream_events(main_server, body)
    assert all(e["token"]["prompt_cache_len"] == again["prompt_tokens"] - 1 for e in events)
    assert uncached_server.post("/generate", body).json()["prompt_cache_len"] == 0
    assert all(e["token"]["prompt_cache_len"] == 0 for e in stream_events(uncached_server, body))
    metrics = main_server.get("/metrics").text
    assert "lightvlm_prefix_cache_hit_rate" in metrics and "lightvlm_prefix_cache_evicted_tokens" in metrics
