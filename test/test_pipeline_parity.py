"""The offline pipeline gives transformers' greedy tokens on the same checkpoint and inputs.

Runs on both tiny checkpoints (Qwen2 backbone; Llama backbone with other head counts, GQA ratio,
layer count and tile size).
"""

import pytest
import torch

import lightvlm.engine.model_runner as model_runner
from lightvlm import GenerationConfig, pipeline

from helpers import load_image
from hf_reference import assert_same_greedy, hf_generate, hf_inputs, hf_messages, hf_model

MAX_NEW = 40


@pytest.fixture(scope="module")
def pipes():
    return {}


@pytest.fixture
def pipe(tiny_checkpoint, pipes):
    if tiny_checkpoint not in pipes:
        pipes[tiny_checkpoint] = pipeline(tiny_checkpoint, max_batch_size=16, session_len=2048,
                                          max_total_token_num=16 * 2048)
    return pipes[tiny_checkpoint]


def check(pipe, model_dir, text, images, max_new_tokens=MAX_NEW, response=None, label=""):
    reference, inputs = hf_generate(model_dir, hf_messages(text, images), max_new_tokens)
    if response is None:
        response = pipe((text, images) if images else text, GenerationConfig(max_new_tokens=max_new_tokens))
    assert response.input_token_len == inputs["input_ids"].shape[1]
    assert_same_greedy(model_dir, response.token_ids, reference, inputs, label or text)
    return response


def test_text_only_matches_transformers(pipe, tiny_checkpoint):
    r = check(pipe, tiny_checkpoint, "What is in this picture? Describe the cat in detail.", [])
    assert r.generate_token_len == len(r.token_ids) > 0


def test_one_image_matches_transformers(pipe, tiny_checkpoint):
    check(pipe, tiny_checkpoint, "Describe this image.", [load_image("coffee.jpg")])


def test_two_images_of_different_shapes_match_transformers(pipe, tiny_checkpoint):
    wide, square = load_image("coffee_strip_600x40.jpg"), load_image("camera_gray.png")
    assert pipe.processor.image_layout(*wide.size).num_tiles > 2
    assert pipe.processor.image_layout(*square.size).num_tiles > 2
    check(pipe, tiny_checkpoint, "What differs between these two pictures?", [wide, square])


def mixed_requests():
    names = ["coffee.jpg", "chelsea_rgba.png", "astronaut_10x10.png", "coffee_palette.png", "rocket.jpg"]
    texts = ["Hi.", "Describe this image in one sentence, please, with the colors and the shapes you see.",
             "What animal is shown in the photo?", "Count the objects.",
             "Where was this photo taken? Is it day or night?",
             "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12", "Read the text.", "A"]
    requests = []
    for i, text in enumerate(texts):
        images = [load_image(names[i % len(names)])] if i % 3 else []
        if i == 5:
            images = [load_image("coffee.webp"), load_image("chelsea.png")]
        requests.append((text, images, 8 + 7 * i))
    return requests


def test_batch_of_eight_mixed_requests_matches_transformers(pipe, tiny_checkpoint):
    requests = mixed_requests()
    responses = pipe([(t, ims) if ims else t for t, ims, _ in requests], GenerationConfig(max_new_tokens=64))
    assert len({r.input_token_len for r in responses}) > 4  # really different prompt lengths
    for (text, images, _), response in zip(requests, responses):
        check(pipe, tiny_checkpoint, text, images, 64, response, label=f"batch: {text}")
    # different max_new_tokens in one batch: each request added with its own config
    ids = [pipe.add_request((t, ims) if ims else t, GenerationConfig(max_new_tokens=n)) for t, ims, n in requests]
    done = {}
    while len(done) < len(ids):
        done.update((r.index, r) for r in pipe.step())
    for (text, images, n), req_id in zip(requests, ids):
        assert done[req_id].generate_token_len <= n
        check(pipe, tiny_checkpoint, text, images, n, done[req_id], label=f"max_new={n}: {text}")


def test_requests_joining_while_others_decode_match_transformers(pipe, tiny_checkpoint):
    requests = mixed_requests()
    config = GenerationConfig(max_new_tokens=48)
    ids, done = {}, {}
    for i, (text, images, _) in enumerate(requests):
        ids[pipe.add_request((text, images) if images else text, config)] = (text, images)
        for _ in range(3 + i):  # let the running ones decode a few steps before the next arrives
            done.update((r.index, r) for r in pipe.step())
    while len(done) < len(ids):
        done.update((r.index, r) for r in pipe.step())
    for req_id, (text, images) in ids.items():
        check(pipe, tiny_checkpoint, text, images, 48, done[req_id], label=f"joined: {text}")
    pipe.scheduler.allocator.check_integrity()
    assert pipe.scheduler.allocator.num_used == 0
    assert not pipe.images  # every embedding released


def test_first_token_logits_match_transformers(pipe, tiny_checkpoint, monkeypatch):
    captured = []
    real_sample = model_runner.sample

    def spy(logits, batch):
        captured.append(logits.clone())
        return real_sample(logits, batch)

    monkeypatch.setattr(model_runner, "sample", spy)
    images = [load_image("chelsea.png")]
    pipe(("Describe this image.", images), GenerationConfig(max_new_tokens=1))
    inputs = hf_inputs(tiny_checkpoint, hf_messages("Describe this image.", images))
    with torch.no_grad():
        reference = hf_model(tiny_checkpoint)(**inputs).logits[0, -1]
    assert captured[0].shape == (1, reference.shape[0])
    assert torch.allclose(captured[0][0], reference, atol=1e-4, rtol=0), (captured[0][0] - reference).abs().max()
